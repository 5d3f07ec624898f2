"""Stop strings: end a generation when its decoded text contains one of them."""

from typing import Optional, Sequence


class StopStrings:
    """Finds stop strings in generated token ids by decoding only the tail that could hold one.

    A generation that hits a stop string keeps the tokens whose text ends before it, so no part of the
    stop string appears in the output.

    Args:
        tokenizer: any Verse tokenizer (`decode(ids) -> str`).
        stop_strings (Sequence[str]): non-empty strings.
    """

    def __init__(self, tokenizer, stop_strings: Sequence[str]):
        from verse.errors import VerseError

        if tokenizer is None:
            raise VerseError("stop_strings need a tokenizer to decode the generated text")
        self.tokenizer = tokenizer
        self.strings = [s for s in stop_strings if s]
        # a token yields at least one byte of text, and a character is at most 4 UTF-8 bytes
        self.window = 4 * max((len(s) for s in self.strings), default=0) + 4

    def _tail(self, ids: Sequence[int], start: int) -> str:
        return self.tokenizer.decode(list(ids[start:]))

    def find(self, ids: Sequence[int]) -> Optional[int]:
        """Where to cut `ids` if their text now contains a stop string.

        Args:
            ids (Sequence[int]): the generated ids so far (earlier prefixes were checked already).

        Returns:
            Optional[int]: the number of leading ids whose text ends before the stop string (a token that
            straddles its start is dropped), or None when no stop string occurs.
        """
        start = max(0, len(ids) - self.window)
        text = self._tail(ids, start)
        found = [i for i in (text.find(s) for s in self.strings) if i >= 0]
        if not found:
            return None
        keep = len(ids)
        while keep > start and len(self._tail(ids[:keep], start)) > min(found):
            keep -= 1
        return keep

    def holdback(self, ids: Sequence[int]) -> int:
        """How many trailing ids might be the start of a stop string (a stream must not emit them yet).

        Args:
            ids (Sequence[int]): the generated ids so far (containing no complete stop string).

        Returns:
            int: number of trailing ids to hold back.
        """
        start = max(0, len(ids) - self.window)
        text = self._tail(ids, start)
        partial = max((i for s in self.strings for i in range(1, len(s)) if text.endswith(s[:i])), default=0)
        if partial == 0:
            return 0
        held = 1
        while held < len(ids) - start and len(self._tail(ids, len(ids) - held)) < partial:
            held += 1
        return held
