"""Which tensors WUDI solves for: one rule for every door (YAML, ``merge_tensors``,
``merge_state_dicts``, the Lightning callback).

WUDI's premise (arXiv 2503.08099, Sec. 3) is that a *linear layer's* task vector spans the inputs
that layer saw. The authors therefore solve Eq. 1 only for the weights of linear layers and keep
everything else (biases, norms, embeddings, heads) at the base. A tensor is a linear weight when

1. the per-tensor ``linear`` parameter says so (``True``/``False`` always wins), else
2. it is 2-D, has no vocabulary axis (mergekit marks ``embed_tokens`` / ``lm_head`` of the
   architectures it knows), and its name is not a vocabulary name (:func:`is_vocabulary_name`).

Rule 2's name check is what the in-memory API relies on: ``merge_state_dicts`` builds tensor groups
without architecture information, so ``model.embed_tokens.weight`` would otherwise look like any
other 2-D weight. The Lightning callback passes ``linear`` explicitly from the module types.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

# Name components (between dots) that mark a vocabulary-sized embedding or output matrix.
VOCABULARY_COMPONENTS = frozenset({"lm_head", "embed_out", "wte", "wpe", "shared", "output_embeddings"})
_EMBEDDING_COMPONENT = re.compile(r"embed|embedding")


def is_vocabulary_name(name: Optional[str]) -> bool:
    """``True`` for embedding tables and LM heads by name: a dotted component equal to one of
    :data:`VOCABULARY_COMPONENTS` or containing ``embed`` (``embed_tokens``, ``word_embeddings``,
    ``embed_positions``, ...)."""
    if not name:
        return False
    components = name.split(".")
    return any(c in VOCABULARY_COMPONENTS or _EMBEDDING_COMPONENT.search(c) for c in components)


def is_linear_weight(
    name: Optional[str],
    shape: Sequence[int],
    vocabulary_axis: Optional[int] = None,
    linear: Optional[bool] = None,
) -> bool:
    """The rule of this module's docstring."""
    if linear is not None:
        return bool(linear)
    return len(shape) == 2 and vocabulary_axis is None and not is_vocabulary_name(name)
