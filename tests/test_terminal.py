"""Control characters from data or a model: escaped when written to a terminal, raw when piped."""

import io

from verse.terminal import escape_controls, for_stream, is_terminal


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_escape_controls_by_hand():
    text = "a\x1b[2J\tb\nc\r\x07\x00\x7f\x9b2Jé€\u200b"
    assert escape_controls(text) == "a\\x1b[2J\tb\nc\\x0d\\x07\\x00\\x7f\\x9b2Jé€\u200b"
    assert for_stream(text, Tty()) == escape_controls(text)
    assert for_stream(text, io.StringIO()) == text  # piped / a file: raw
    assert is_terminal(Tty()) and not is_terminal(io.StringIO()) and not is_terminal(object())
