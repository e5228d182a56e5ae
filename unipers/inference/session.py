"""InferenceSession: load the base once, add any number of concept files, then ask, recognize, generate.

    from unipers.inference import InferenceSession
    s = InferenceSession.from_config(load_config(["base"]))
    s.load("runs/bo/concepts/last.safetensors"); s.load("runs/mam/concepts/last.safetensors")
    s.ask("What is <bo> doing?", images=["photo.jpg"])
    s.recognize("bo", ["a.jpg", "b.jpg"])            # P(yes) per image
    out = s.generate(["<bo> and <mam> on a sofa"], seed=0)
    out.images[0].save("sofa.png")                     # PIL images; out.tensors, out.settings
    s.generate(["<bo> in the place where it lives"], think=True)   # drawn as the AR model rewrites it
    s.unload("mam")                                    # one concept; s.unload() for all
    with s.concepts_disabled():                        # the untrained base
        s.ask("What is a dog?")

Every input is checked before any work: a concept the prompt names but no file provides (the message
lists the loaded ones), a concept file made for another base, an unreadable image (named), a prompt
longer than the model's context, a number out of its range (``common.OPTION_RANGES``, the same ranges the
commands' flags have; the message names the argument).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor

from unipers.concepts.names import MARKER_PATTERN
from unipers.concepts.prompts import IMAGE_MARKER, PromptError
from unipers.concepts.recognition import recognition_layout
from unipers.inference.options import InputError, check_option
from unipers.inference.output import GenerationOutput, GenerationSettings, save_images
from unipers.models.padding import pad_batch
from unipers.models.unified import UnifiedModel


__all__ = ["GenerationOutput", "GenerationSettings", "InferenceSession", "InputError", "save_images"]


THINK_QUESTION = "Rewrite this image prompt with what you know about {concepts}: {prompt}"
"""What `InferenceSession.think` asks the AR model (``unipers generate --think``), after its recall."""


class InferenceSession:
    def __init__(self, model: UnifiedModel):
        self.model = model.eval()
        self.files: dict[str, str] = {}  # concept name -> file it came from

    @classmethod
    def from_config(cls, cfg, device: Optional[str] = None) -> "InferenceSession":
        model = UnifiedModel.from_config(cfg)
        if device:
            model.to(device)
        return cls(model)

    @property
    def backbone(self):
        return self.model.backbone

    @property
    def concepts(self) -> list[str]:
        return self.model.bank.names

    def load(self, path: str | os.PathLike) -> list[str]:
        """Add a concept file (checked against the base, decoder and connector fingerprints)."""
        names = self.model.load_concepts(path)
        self.files.update({n: str(path) for n in names})
        return names

    def unload(self, name: Optional[str] = None) -> None:
        """Remove one concept, or every loaded one (e.g. before loading the next step file of a run)."""
        if name is None:
            self.model.bank.clear()
            self.files.clear()
        else:
            self.model.bank.remove(name)
            self.files.pop(name, None)

    @contextmanager
    def concepts_disabled(self) -> Iterator[None]:
        """Answer and generate with the untrained base inside the block; the concepts are back after it."""
        files = dict(self.files)
        with self.model.bank.disabled():
            self.files.clear()
            try:
                yield
            finally:
                self.files.update(files)

    @contextmanager
    def concepts_untrained(self, settings: Optional[dict[str, dict]] = None, **default) -> Iterator[None]:
        """Inside the block every loaded concept holds the rows its training started from: the same names,
        prompts and slots with nothing learned, the "no concept token" baseline. ``settings[name]`` (else
        ``default``) gives `initial_rows`' init, init_noise and seed, as the training config had them. The
        trained rows are back after it."""
        backbone, settings = self.model.backbone, settings or {}
        values = {name: backbone.initial_rows(name, info.class_word, layout=info.layout,
                                              **settings.get(name, default))
                  for name, info in self.model.bank.info.items()}
        with self.model.bank.rows_replaced(values):
            yield

    # ---- checks -----------------------------------------------------------------------------------------
    def _check_prompt(self, text: str) -> None:
        vocab = self.model.prompts.vocab
        unknown = [n for n in MARKER_PATTERN.findall(text) if n not in self.model.bank and f"<{n}>" not in vocab]
        if unknown:
            loaded = ", ".join(f"<{n}>" for n in self.concepts) or "none (pass --concept FILE)"
            raise InputError(f"the prompt names <{unknown[0]}>, which is not loaded; loaded: {loaded}")

    def image_tokens(self, paths: Sequence[str | os.PathLike]) -> list[Tensor]:
        """VQ tokens of image files, through the same photo loader as `unipers prepare` (EXIF, CMYK, ...)."""
        from unipers.data.images import PhotoError, open_rgb

        images = []
        for path in paths:
            try:
                images.append(open_rgb(path, max_side=2048))
            except (PhotoError, OSError) as err:
                raise InputError(f"{path}: cannot read image ({err})") from err
        if not images:
            return []
        pixels = self.backbone.processor.image_processor(images=images, return_tensors="pt").pixel_values
        return list(self.backbone.encode_images(pixels))

    def _encode(self, text: str, images: Sequence[Tensor]) -> list[int]:
        try:
            return self.model.prompts.encode_question(text, images=images)
        except PromptError as err:
            raise InputError(str(err)) from err

    def _check_generation(self, *, size: Optional[int], **options) -> None:
        for name, value in options.items():
            check_option(name, value)
        if size is not None:
            check_option("size", size)
            scale = self.model.decoder.vae_scale_factor
            if size % scale:
                raise InputError(f"size must be a multiple of {scale}, the decoder's VAE downsampling; got {size}")

    # ---- understanding ----------------------------------------------------------------------------------
    @torch.no_grad()
    def ask(self, question: str, images: Sequence[str | os.PathLike] = (), *, history: Sequence[tuple[str, str]] = (),
            max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
            use_cache: bool = True, described: bool = False) -> str:
        """Answer `question` (with `<image>` placeholders, or images placed before it), after `history`.

        ``described``: ask about one image as `recognize` does with ``backbone.describe_first``, after the
        base's own description of it (the question then holds no placeholder)."""
        for name, value in (("max_new_tokens", max_new_tokens), ("temperature", temperature), ("top_p", top_p),
                            ("seed", seed)):
            check_option(name, value)
        self._check_prompt(question)
        tokens = self.image_tokens(images)
        if described:
            if len(tokens) != 1 or history:
                raise InputError("a described question takes exactly one image and no history")
            ids = self.recognition_prompts(question, tokens)[0]
        else:
            if tokens and IMAGE_MARKER not in question:
                question = IMAGE_MARKER * len(tokens) + "\n" + question
            ids = self._conversation(question, tokens, history)
        out = self.backbone.generate(torch.tensor([ids], device=self.backbone.device), max_new_tokens=max_new_tokens,
                                     temperature=temperature, top_p=top_p, use_cache=use_cache,
                                     generator=torch.Generator().manual_seed(seed))
        return self.decode(out[0].tolist())

    def decode(self, ids: Sequence[int]) -> str:
        """Text of generated ids: a concept's identifier token reads as ``<name>``, its other slots as nothing."""
        bb = self.backbone
        names = {info.first_id: f"<{name}>" for name, info in bb.bank.info.items()}
        pieces, run = [], []
        for i in ids:
            if i < bb.vocab_size:
                run.append(i)
                continue
            pieces.append(bb.tokenizer.decode(run, skip_special_tokens=True))
            run = []
            pieces.append(names.get(i, ""))
        pieces.append(bb.tokenizer.decode(run, skip_special_tokens=True))
        return "".join(pieces).strip()

    def _conversation(self, question: str, images: Sequence[Tensor], history: Sequence[tuple[str, str]]) -> list[int]:
        """Earlier turns, then the question: ``q <sep> a </s> q <sep> a </s> ... q <sep>``."""
        prompts = self.model.prompts
        ids: list[int] = []
        for i, (q, a) in enumerate(history):
            enc = prompts.encode_qa(q, a)
            ids += enc.ids[1:] if i else enc.ids  # one BOS for the whole conversation
        turn = self._encode(question, images)
        ids += turn[1:] if ids else turn
        limit = prompts.max_length
        if limit is not None and len(ids) >= limit:
            raise InputError(f"the conversation is {len(ids)} tokens, longer than the model's context of {limit}")
        return ids

    @torch.no_grad()
    def recognize(self, concept: str, images: Sequence[str | os.PathLike],
                  question: str = "Is <{name}> in this photo?") -> list[float]:
        """P(yes) per image, from the Yes/No answer-token logits after the question."""
        if concept not in self.model.bank:
            self._check_prompt(f"<{concept}>")
        bb = self.backbone
        seqs = self.recognition_prompts(question.format(name=concept), self.image_tokens(images))
        ids, mask = pad_batch(seqs, bb.tokenizer.pad_token_id, side="left")
        ids, mask = ids.to(bb.device), mask.to(bb.device)
        hidden, _ = bb.hidden_states(ids, mask)
        return bb.yes_probability(bb.logits(hidden[:, -1], bb.bank.presence(ids))).tolist()

    def recognition_prompts(self, question: str, images: Sequence[Tensor]) -> list[list[int]]:
        """Prompt ids of a question about each image (VQ tokens): the image, then the question; or, with
        ``backbone.describe_first``, the base's description of the image first and the question as turn two."""
        layout = recognition_layout(self.model.prompts)
        descriptions = self.model.describe(images) if layout.describes else [None] * len(images)
        try:
            return [layout.question(question, t, d) for t, d in zip(images, descriptions)]
        except PromptError as err:
            raise InputError(str(err)) from err

    # ---- generation -------------------------------------------------------------------------------------
    @torch.no_grad()
    def loaded_in(self, prompt: str) -> list[str]:
        """The loaded concepts a prompt names, in order of first mention (what `think` rewrites for)."""
        return [n for n in dict.fromkeys(MARKER_PATTERN.findall(prompt)) if n in self.model.bank]

    def recall(self, name: str, *, max_new_tokens: int = 64) -> str:
        """What the model says it knows about a loaded concept: its greedy answer to the question prepare
        trains a concept's facts under (``data.samples.SUMMARY_QUESTION``, "What do you know about <bo>?")."""
        from unipers.data.samples import SUMMARY_QUESTION

        return self.ask(SUMMARY_QUESTION.format(c=f"<{name}>"), max_new_tokens=max_new_tokens).strip()

    @torch.no_grad()
    def think(self, prompt: str, *, max_new_tokens: int = 64, recall: bool = True) -> str:
        """The AR model's rewrite of an image prompt with what it knows about the concepts the prompt names,
        for the decoder to draw: "<bo> in the place where it lives" -> "<bo> in the kitchen" when it learned
        where <bo> lives. With ``recall`` the model first says what it knows about each concept (`recall`),
        and that text stands before the rewrite question (THINK_QUESTION, answered greedily): facts written
        out in context are read more reliably than the same facts held in a concept's rows. A rewrite that
        drops a concept the prompt names would draw something else: InputError, quoting it."""
        self._check_prompt(prompt)
        named = self.loaded_in(prompt)
        if not named:
            raise InputError(f"--think rewrites a prompt with what the model knows about its concepts; "
                             f"{prompt!r} names no loaded concept")
        question = THINK_QUESTION.format(concepts=" and ".join(f"<{n}>" for n in named), prompt=prompt)
        if recall:
            question = " ".join(self.recall(n, max_new_tokens=max_new_tokens) for n in named) + " " + question
        rewrite = self.ask(question, max_new_tokens=max_new_tokens).strip()
        dropped = [f"<{n}>" for n in named if f"<{n}>" not in rewrite]
        if dropped:
            raise InputError(f"--think: the model rewrote {prompt!r} as {rewrite!r}, which drops "
                             f"{', '.join(dropped)}; generate without --think")
        return rewrite

    def generate(self, prompts: Sequence[str], *, negative: str = "", seed: int = 0, num_images: int = 1,
                 steps: int = 25, guidance: float = 5.0, size: Optional[int] = None, scheduler: Optional[str] = None,
                 batched_cfg: bool = True, think: bool = False) -> GenerationOutput:
        """`num_images` images for every prompt (``.images``: PIL; ``.tensors``: (N, 3, H, W) in [0, 1];
        ``.settings``); image i of a prompt uses seed + i, so a batch of prompts gives the same images as one
        call per prompt. ``think``: draw each prompt as `think` rewrites it (``settings[i].thought_from``
        keeps the prompt as given)."""
        self._check_generation(num_images=num_images, steps=steps, guidance=guidance, size=size, seed=seed)
        for text in (*prompts, negative):
            self._check_prompt(text)
        given = list(prompts)
        if think:
            prompts = [self.think(p) for p in given]
        texts = [p for p in prompts for _ in range(num_images)]
        seeds = [seed + i for _ in prompts for i in range(num_images)]
        try:
            images = self.model.generate_images(texts, seeds, negative=negative, steps=steps, guidance=guidance,
                                                size=size, scheduler=scheduler, batched_cfg=batched_cfg)
        except PromptError as err:
            raise InputError(str(err)) from err
        files = sorted(set(self.files.values()))
        origins = [g if think else None for g in given for _ in range(num_images)]
        settings = [GenerationSettings(t, negative, s, steps, guidance, size, scheduler, files, o)
                    for t, s, o in zip(texts, seeds, origins)]
        return GenerationOutput(images, settings)

