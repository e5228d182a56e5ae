"""Yo'Chameleon training JSONs -> a prepared concept folder (``unipers prepare --from-yochameleon``);
importers.py describes the format."""

from __future__ import annotations

import dataclasses
import json
import random
import re
from pathlib import Path
from typing import Iterable, Sequence

from unipers.concepts.names import validate_name
from unipers.data.importers_common import (ImportRefused, check_val_fraction, held_out_split, issue, issue_lines,
                                           read_facts_option, resolve_under)
from unipers.data.manifest import Sample
from unipers.data.samples import mention, normalize_mentions

IDENTIFIER = "<reserved16200>"
"""Yo'Chameleon's concept identifier (its ``SKS_TOKEN``); its latent tokens are ``<reserved16201>`` on."""
TOKEN = re.compile(r"<reserved\d+>")
RUN = re.compile(r"<reserved\d+>(?:\s*<reserved\d+>)*")
# Yo'Chameleon's personalisation prefix, "<sks> is <latent><latent>...": unipers writes its own (the
# concept's slots) in front of every prompt, so the imported one is dropped, not turned into "<bo> is <bo>".
PREFIX = re.compile(r"(<reserved\d+>|<sks>|\bsks\b)\s+is\s+((?:<reserved\d+>\s*)+)\.?")
GAP = "\x00"
YES_NO = re.compile(r"^\W*(yes|no)\b", re.IGNORECASE)
CAPTION_REQUEST = re.compile(r"\b(describe|description|caption)\b", re.IGNORECASE)
HUMAN, BOT = {"human", "user"}, {"bot", "gpt", "assistant", "ai"}


def _texts(data) -> Iterable[str]:
    for rec in data if isinstance(data, list) else []:
        if isinstance(rec, dict) and isinstance(rec.get("conversations"), list):
            yield from (t["value"] for t in rec["conversations"]
                        if isinstance(t, dict) and isinstance(t.get("value"), str))


def identifiers_in(texts: Iterable[str]) -> set[str]:
    """The reserved tokens that stand for the concept: ``IDENTIFIER``, the subject of a prefix, and any token
    that appears on its own (a latent token always comes in a run)."""
    out = {IDENTIFIER}
    for t in texts:
        out |= {m.group(1) for m in PREFIX.finditer(t) if m.group(1).startswith("<reserved")}
        out |= {m.group(0) for m in RUN.finditer(PREFIX.sub(" ", t)) if len(TOKEN.findall(m.group(0))) == 1}
    return out


def clean_text(text: str, name: str, identifiers: set[str] = frozenset({IDENTIFIER})) -> tuple[str, int]:
    """Text with ``<image>`` removed, the prefix ``X is <latents>.`` dropped, every identifier token (and
    ``<sks>`` / whole-word ``sks``) written ``<name>`` and latent tokens dropped; also the largest number of
    latent tokens seen in one place (a generation prompt's share of the concept's slots)."""
    latents = 0

    def prefix(m):
        nonlocal latents
        latents = max(latents, len(TOKEN.findall(m.group(2))))
        return GAP

    def run(m):
        nonlocal latents
        toks = TOKEN.findall(m.group(0))
        ident = [t for t in toks if t in identifiers]
        latents = max(latents, len(toks) - len(ident))
        return mention(name) if ident else GAP

    text = PREFIX.sub(prefix, text.replace("<image>", " "))
    text = normalize_mentions(RUN.sub(run, text), name, ["sks"], bare_name=False)
    text = re.sub(rf"[ \t]*{GAP}[ \t]*(?=[.,!?;:])", "", text).replace(GAP, " ")  # no " ." where tokens were
    return re.sub(r"[ \t]+", " ", re.sub(r" *\n *", "\n", text)).strip(), latents


def scan(paths: Sequence[Path | str], name: str) -> tuple[set[str], int]:
    """(identifier tokens, longest latent run) over all the files: the soft positives' fewer latent tokens
    are a share of the longest run in any of them (positives and soft positives often sit in two files)."""
    texts = []
    for p in paths:
        try:
            texts += list(_texts(json.loads(Path(p).read_text(encoding="utf-8"))))
        except (OSError, ValueError):
            continue  # read_yochameleon reports it
    ids = identifiers_in(texts)
    return ids, max((clean_text(t, name, ids)[1] for t in texts), default=0)


def read_yochameleon(json_path: Path | str, name: str, *, image_root: Path | str | None = None,
                     split: str = "train", num_gen_slots: int = 8, identifiers: set[str] | None = None,
                     longest: int | None = None) -> tuple[list[Sample], list[dict]]:
    """Samples from one Yo'Chameleon training JSON (see importers.py); images are source paths found under
    ``image_root`` (default: the JSON's folder) only."""
    path = Path(json_path)
    base = Path(image_root) if image_root else path.parent
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return [], [issue(f"yochameleon:{path.name}", f"cannot read JSON: {e}")]
    if not isinstance(data, list):
        return [], [issue(f"yochameleon:{path.name}", f"expected a JSON list of records, got {type(data).__name__}")]
    if identifiers is None or longest is None:
        identifiers, longest = scan([path], name)
    out, issues = [], []
    for i, rec in enumerate(data):
        where = f"yochameleon:{path.name}#{i}"
        if not isinstance(rec, dict):
            issues.append(issue(where, f"record is a {type(rec).__name__}, expected an object"))
            continue
        images, conv = rec.get("image", []), rec.get("conversations")
        images = [images] if isinstance(images, str) else images
        if not isinstance(images, list) or not all(isinstance(x, str) for x in images):
            issues.append(issue(where, "'image' must be a path or a list of paths"))
            continue
        if not isinstance(conv, list) or not conv:
            issues.append(issue(where, "missing or empty 'conversations' list"))
            continue
        resolved = [resolve_under(x, base) for x in images]
        used, n_issues = 0, len(issues)
        for j in range(0, len(conv) - 1, 2):
            h, b = conv[j], conv[j + 1]
            tw = f"{where}.conversations[{j}]"
            if not (isinstance(h, dict) and isinstance(b, dict) and isinstance(h.get("value"), str)
                    and isinstance(b.get("value"), str)):
                issues.append(issue(tw, "turn without a string 'value'"))
                continue
            if str(h.get("from", "")).lower() not in HUMAN or str(b.get("from", "")).lower() not in BOT:
                got = f"{h.get('from')!r}, {b.get('from')!r}"
                issues.append(issue(tw, f"expected a human turn then a bot turn, got {got}"))
                continue
            n_in, n_out = h["value"].count("<image>"), b["value"].count("<image>")
            imgs, refs = resolved[used:used + n_in + n_out], images[used:used + n_in + n_out]
            used += n_in + n_out
            if len(imgs) < n_in + n_out:
                issues.append(issue(tw, f"{n_in + n_out} <image> placeholder(s) but only {len(imgs)} image(s) left"))
                continue
            if n_in + n_out > 1:
                issues.append(issue(tw, f"turn uses {n_in + n_out} images; a manifest sample holds one"))
                continue
            if imgs and imgs[0] is None:
                issues.append(issue(tw, f"image not found under {base} (--image-root): {refs[0]}"))
                continue
            q, q_latents = clean_text(h["value"], name, identifiers)
            a, _ = clean_text(b["value"], name, identifiers)
            img = str(imgs[0]) if imgs else None
            if n_out:
                slots = max(1, round(q_latents / longest * num_gen_slots)) if 0 < q_latents < longest else None
                out.append(Sample("generation", name, split, image=img, prompt=q, gen_slots=slots, source=tw))
            elif n_in:
                m = YES_NO.match(a)
                task = "recognition" if m else "caption" if CAPTION_REQUEST.search(q) else "vqa"
                label = (m.group(1).lower() == "yes") if m else None
                out.append(Sample(task, name, split, image=img, question=q, answer=a, label=label, source=tw))
            else:
                out.append(Sample("qa", name, split, question=q, answer=a, source=tw))
        if len(conv) % 2:
            issues.append(issue(f"{where}.conversations[{len(conv) - 1}]", "unanswered last turn"))
        if used < len(resolved) and len(issues) == n_issues:  # (a broken turn already explains it)
            issues.append(issue(where, f"{len(resolved) - used} image(s) listed but not referenced by <image>"))
    return out, issues


def _held_out_asked(samples: list[Sample], held: Sequence[str], name: str, seed: int) -> list[Sample]:
    """A recognition question for each held-out photo that no imported one asks about: eval scores
    recognition on the held-out split's "yes" samples."""
    from unipers.data.samples import POSITIVE_ANSWERS, RECOGNITION_QUESTIONS

    asked = {s.image for s in samples if s.task == "recognition" and s.split == "val" and s.label}
    rng, c = random.Random(f"{seed}/held-out"), mention(name)
    return [Sample("recognition", name, "val", image=src, question=rng.choice(RECOGNITION_QUESTIONS).format(c=c),
                   answer=rng.choice(POSITIVE_ANSWERS).format(c=c), label=True, source="held-out photo")
            for src in held if src not in asked]


def import_yochameleon(json_paths: Sequence[Path | str] | Path | str, name: str, out_dir: Path | str, *,
                       image_root: Path | str | None = None, class_word: str | None = None,
                       facts: Path | str | None = None, seed: int = 0, val_fraction: float = 0.2,
                       skip_bad: bool = False, overwrite: bool = False, options=None) -> Path:
    """One prepared folder from Yo'Chameleon JSONs. The positive photos (recognition "yes" images and
    full-slot generation targets) are split like ``prepare`` splits photos: ``val_fraction`` of them (at
    least one) are held out, with every sample about them, so eval can score recognition; the recognition
    "no" images are the negatives, held out the same way. Samples are the imported ones, plus ``facts``."""
    from unipers.data.images import PhotoError, load_photo
    from unipers.data.prepare import ConceptInputs, PrepareOptions, build_prepared, split_negatives
    from unipers.io import check_output

    validate_name(name)
    opts = options or PrepareOptions()
    check_val_fraction(val_fraction)
    if val_fraction == 0:
        raise ImportRefused("--val-fraction 0: Yo'Chameleon data has no test split, so without held-out photos "
                            "eval could never score recognition; give a share > 0")
    paths = [Path(json_paths)] if isinstance(json_paths, (str, Path)) else [Path(p) for p in json_paths]
    for p in paths:
        if not p.is_file():
            raise ImportRefused(f"--from-yochameleon {p}: file not found")
    if image_root is not None and not Path(image_root).is_dir():
        raise ImportRefused(f"--image-root {image_root}: not a folder")
    fact_list, pairs, facts_source = read_facts_option(facts, name)
    check_output(out_dir, overwrite=overwrite, inputs=[*paths, *(x for x in (image_root, facts) if x)])
    ids, longest = scan(paths, name)
    samples, issues = [], []
    for p in paths:
        s, i = read_yochameleon(p, name, image_root=image_root, num_gen_slots=opts.num_gen_slots,
                                identifiers=ids, longest=longest)
        samples += s
        issues += i
    files = ", ".join(map(str, paths))
    if not samples:
        raise ImportRefused(f"{files}: no usable records ({len(issues)} problem(s), listed before this line)",
                            details=issue_lines(issues))
    full_gen = lambda s: s.task == "generation" and s.gen_slots is None  # noqa: E731
    pos = list(dict.fromkeys(s.image for s in samples if s.image and (s.label is True or full_gen(s))))
    neg = [x for x in dict.fromkeys(s.image for s in samples if s.image and s.label is False) if x not in set(pos)]
    photos, skipped = [], []
    for src in pos:
        try:
            photos.append(load_photo(src, max_side=opts.max_side, min_side=opts.min_side))
        except PhotoError as e:
            if not skip_bad:
                raise PhotoError(e.file, e.reason + " (use --skip-bad to skip such files)") from None
            skipped.append({"file": src, "reason": e.reason})
    gone = {d["file"]: d["reason"] for d in skipped}
    issues += [issue(s.source, f"image skipped: {gone[s.image]}") for s in samples if s.image in gone]
    samples = [s for s in samples if s.image not in gone]
    tr, va = held_out_split(len(photos), val_fraction, seed, opts.min_val)
    if not va:
        raise ImportRefused(f"{files}: {len(photos)} usable positive photo(s); at least 2 are needed to hold one "
                            "out, or eval could never score recognition")
    held = [str(photos[i].path) for i in va]
    train_negs, val_negs = split_negatives(neg, True, val_fraction, seed)
    out_of_training = set(held) | set(val_negs)
    samples = [dataclasses.replace(s, split="val") if s.image in out_of_training else s for s in samples]
    samples += _held_out_asked(samples, held, name, seed)
    inputs = ConceptInputs(name=name, train=[photos[i] for i in tr], val=[photos[i] for i in va],
                           given_negatives=train_negs, val_negatives=val_negs, generate_samples=False,
                           class_word=class_word, facts=fact_list, fact_pairs=pairs, facts_source=facts_source,
                           extra_samples=samples, issues=issues, photo_report={"skipped": skipped})
    return build_prepared(inputs, Path(out_dir), seed=seed, val_fraction=val_fraction, overwrite=overwrite,
                          options=opts)
