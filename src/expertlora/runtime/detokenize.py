"""A request's output text, decoded a few tokens at a time.

Decoding every output token again at each step costs O(n) per token, O(n^2) over a long
output, for every running request. Instead each step decodes a short window twice:

    window = decode(ids[start:])           the tokens since the last clean boundary
    prefix = decode(ids[start:read])       what of that window was already emitted
    text  += window[len(prefix):]

Starting the window a few tokens back (at ``start``, not ``read``) keeps what depends on the
tokens before (a leading space a SentencePiece decoder strips from a window's first token, a
character split across byte-level tokens) the same in both decodes; so the tokens before ``read``
must decode to something (special tokens decode to nothing: the window then starts further back). A window whose text ends in
an incomplete character ("\ufffd") is held back until its bytes arrive, or until the request ends.
Where the window does not extend its prefix (a decoder that rewrites across the boundary), the
whole output is decoded once, as before.
"""

from __future__ import annotations


class IncrementalText:
    def __init__(self, tokenizer):
        """``tokenizer``: the checkpoint's (``decode(ids, skip_special_tokens=True)``), or None: no text."""
        self.tokenizer = tokenizer
        self.text = ""
        self._start = self._read = 0  # the window: ids[start:]; ids[start:read] decode to _prefix
        self._prefix = ""

    def update(self, ids: list[int], final: bool = False) -> str:
        """The text of the output ``ids`` (the same list, grown since the last call); an
        incomplete last character is held back unless ``final``."""
        if self.tokenizer is None:
            return ""
        window = self._decode(ids[self._start:])
        if window.endswith("\ufffd") and not final:
            return self.text
        if window.startswith(self._prefix):
            self.text += window[len(self._prefix):]
        else:
            self.text = self._decode(ids)
        start, prefix = self._read, self._decode(ids[self._read:])
        if not prefix:  # the new tokens decode to nothing (special tokens): the window keeps its older start
            start, prefix = self._start, self._decode(ids[self._start:])
        self._start, self._read, self._prefix = start, len(ids), prefix
        return self.text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""
