"""Token ids -> the text a client receives: incremental decoding and stop strings."""

from __future__ import annotations


class TextStream:
    """The text of a growing output, released only where it can no longer change.

    Held back: a trailing replacement character (half of a multi-byte character) and a tail that
    could still become a stop string. A stop string ends the text before it (OpenAI's ``stop``).
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self._longest = max(map(len, self.stop), default=0)
        self._borders = [_borders(s) for s in self.stop]
        self.sent = ""  # text released so far
        self._text = ""  # the whole output's text at the last push
        # Incremental decoding (as vLLM's detokenizer): the text of ids[:read] is settled in _settled; a
        # push decodes only ids[prefix:], where ids[prefix:read] (decoded: _overlap) are a few tokens of
        # context, so that a tokenizer that decodes a token differently at the start of a text (SentencePiece
        # drops a leading space) still gives the text it gives inside the whole output.
        self._settled = ""
        self._prefix = self._read = 0
        self._overlap = ""

    def push(self, output_ids: list[int]) -> tuple[str, bool]:
        """The newly released text, and whether a stop string ended the output (``output_ids``: the whole
        output so far; each push extends the last one's)."""
        text = self._decode(output_ids)
        self._text = text
        if self.stop:
            # Only text past what was released can hold a new match (the released text held none).
            start = max(0, len(self.sent) - self._longest + 1)
            hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                return self._release(text[:min(hits)]), True
        stable = text.rstrip("\ufffd")
        # Held back: the longest tail that is a proper prefix of a stop string. Each step costs time
        # linear in the stop strings' lengths (the scheduler thread runs it for every sequence).
        hold = max((_prefix_tail(stable[max(0, len(stable) - len(s) + 1):], s, b)
                    for s, b in zip(self.stop, self._borders)), default=0)
        return self._release(stable[:len(stable) - hold]), False

    def _decode(self, ids: list[int]) -> str:
        """The text of the whole output ``ids``, decoding only the tokens past the settled text (each step's
        cost no longer grows with the output); a window that does not extend its overlap decodes it all."""
        decode = self.tokenizer.decode
        window = decode(ids[self._prefix:], skip_special_tokens=True)
        if len(ids) >= self._read and window.startswith(self._overlap):
            text = self._settled + window[len(self._overlap):]
        else:  # not this output's continuation, or a tokenizer whose pieces do not add up: decode it all
            text = decode(ids, skip_special_tokens=True)
            self._settled, self._prefix, self._read, self._overlap = "", 0, 0, ""
        # Settle everything but a trailing half character (a multi-byte character split across tokens).
        if len(ids) > self._read and not text.endswith("\ufffd"):
            self._settled, self._prefix, self._read = text, self._read, len(ids)
            self._overlap = decode(ids[self._prefix:self._read], skip_special_tokens=True)
        return text

    def flush(self) -> str:
        """At the end of the output (not at a stop string): whatever was held back."""
        return self._release(self._text)

    def _release(self, text: str) -> str:
        if not text.startswith(self.sent):  # decoding changed released text (rare): release nothing now
            return ""
        delta = text[len(self.sent):]
        self.sent = text
        return delta


def _borders(s: str) -> list[int]:
    """KMP's failure function: ``b[i]`` is the longest proper prefix of ``s[:i + 1]`` that is also its suffix."""
    b, k = [0] * len(s), 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = b[k - 1]
        if s[i] == s[k]:
            k += 1
        b[i] = k
    return b


def _prefix_tail(tail: str, s: str, borders: list[int]) -> int:
    """The length of the longest suffix of ``tail`` (shorter than ``s``) that is a prefix of ``s``: O(len(tail))."""
    if not tail or s[0] not in tail:
        return 0
    k = 0
    for c in tail:
        while k and s[k] != c:
            k = borders[k - 1]
        if s[k] == c:
            k += 1
    return k
