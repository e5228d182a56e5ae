"""How a recognition question about an image is laid out, in training and at inference alike: one object
chosen by the config (``backbone.describe_first``), asked by every caller instead of branching on it.

    layout = recognition_layout(model.prompts)         # Direct or DescribeFirst
    layout.describes                                   # needs the base's description of each image
    layout.qa(question, answer, image, description)    # training: ids and labels
    layout.question(question, image, description)      # inference: prompt ids ending at the separator

- ``Direct``: the image, then the question (``<image>\\nIs <bo> in this photo?``).
- ``DescribeFirst``: turn one asks the base about the image with no concept in context, and its own greedy
  answer (the description, `UnifiedModel.describe`) is kept; turn two asks about the concept, whose prefix
  then stands beside the base's words for the image. A base pre-trained that way compares the concept with
  its own description rather than with raw image tokens.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

from torch import Tensor

from unipers.concepts.prompts import IMAGE_MARKER, Encoded, PromptBuilder

# (text, images) -> prompt ids ending with the separator: PromptBuilder.encode_question, or a caller's own
# wording of the question (eval's baselines put a reference photo or a text description in context).
Ask = Callable[[str, Sequence[Tensor]], list[int]]


class Direct:
    describes = False

    def __init__(self, prompts: PromptBuilder):
        self.prompts = prompts

    @staticmethod
    def _with_image(question: str) -> str:
        return question if IMAGE_MARKER in question else f"{IMAGE_MARKER}\n{question}"

    def qa(self, question: str, answer: str, image: Tensor, description: Optional[Sequence[int]] = None, *,
           self_prompt: bool = False) -> Encoded:
        return self.prompts.encode_qa(self._with_image(question), answer, images=[image], self_prompt=self_prompt)

    def question(self, question: str, image: Tensor, description: Optional[Sequence[int]] = None, *,
                 ask: Optional[Ask] = None) -> list[int]:
        ask = ask or (lambda text, images: self.prompts.encode_question(text, images=images))
        return ask(self._with_image(question), [image])


class DescribeFirst:
    describes = True

    def __init__(self, prompts: PromptBuilder):
        self.prompts = prompts

    def qa(self, question: str, answer: str, image: Tensor, description: Optional[Sequence[int]] = None, *,
           self_prompt: bool = False) -> Encoded:
        return self.prompts.encode_described_qa(question, answer, image=image, description=description,
                                                self_prompt=self_prompt)

    def question(self, question: str, image: Tensor, description: Optional[Sequence[int]] = None, *,
                 ask: Optional[Ask] = None) -> list[int]:
        if ask is None:
            return self.prompts.encode_described_question(question, image=image, description=description)
        return self.prompts.description_turn(image, description, question) + ask(question, [])[1:]


def recognition_layout(prompts: PromptBuilder) -> Direct | DescribeFirst:
    return DescribeFirst(prompts) if prompts.describe_question else Direct(prompts)
