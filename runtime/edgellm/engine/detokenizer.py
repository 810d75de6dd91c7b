"""Streaming detokenization: token ids in, text deltas out, stop strings applied.

Decoding one token at a time is wrong in two ways: sentencepiece drops the leading space of
whatever piece comes first in a decode call, and a character split over byte-fallback tokens
decodes to U+FFFD until its last byte arrives. So each step decodes a short window that starts
at the tokens emitted last (the prefix) and reaches the newest token, and emits what the window
decodes to beyond the prefix, once that no longer ends in an unfinished character. The window
never holds more than the tokens of the last emission plus the held ones, so a step costs
the same at token 10 and at token 10,000.
"""

from __future__ import annotations

from collections.abc import Sequence

from edgellm.engine.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"
# A UTF-8 character spans at most 4 bytes, so valid text never needs more than 3 held tokens.
# More means the model is producing invalid bytes: show them as U+FFFD rather than let the
# window grow. (Exactness is promised for valid UTF-8 only: a lead byte buried in such
# garbage and completed later may then come out as U+FFFD where decode() shows the char.)
_MAX_HELD_TOKENS = 8


class StreamDecoder:
    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()):
        if isinstance(stop, str):
            stop = (stop,)
        self._tok = tokenizer
        self._stop = tuple(s for s in stop if s)
        self._ids: list[int] = []
        self._prefix_offset = 0  # window start: the tokens of the last emission, for context
        self._read_offset = 0  # tokens before this are emitted; the rest are held
        self._pending = ""  # decoded text held back because it could start a stop string
        self.stopped = False
        self.text = ""

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text that became safe to show ("" if none)."""
        if self.stopped or token_id in self._tok.special_ids or not 0 <= token_id < self._tok.vocab_size:
            return ""  # decode(skip_special=True) drops these too
        self._ids.append(token_id)
        return self._release(self._decode_new(final=False), final=False)

    def flush(self) -> str:
        """End of generation: release everything still held (never text at or past a stop string)."""
        if self.stopped:
            return ""
        return self._release(self._decode_new(final=True), final=True)

    def _decode_new(self, final: bool) -> str:
        if self._read_offset == len(self._ids):
            return ""
        window = self._ids[self._prefix_offset :]
        prefix = self._tok.decode(self._ids[self._prefix_offset : self._read_offset])
        text = self._tok.decode(window)
        held = len(self._ids) - self._read_offset
        if text.endswith(_REPLACEMENT) and not final and held < _MAX_HELD_TOKENS:
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return text[len(prefix) :]

    def _release(self, new_text: str, final: bool) -> str:
        pending = self._pending + new_text
        if not self._stop:
            out, self._pending = pending, ""
        else:
            hits = [i for i in (pending.find(s) for s in self._stop) if i >= 0]
            if hits:
                out, self._pending = pending[: min(hits)], ""
                self.stopped = True
            elif final:
                out, self._pending = pending, ""
            else:
                keep = _stop_prefix_len(pending, self._stop)
                out, self._pending = pending[: len(pending) - keep], pending[len(pending) - keep :]
        self.text += out
        return out


def _stop_prefix_len(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of text that is the beginning of some stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
