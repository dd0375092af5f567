"""`WholeLines`: lines written from several threads, each in pieces, come out whole."""

from __future__ import annotations

import io
import threading

from actors.logsetup import WholeLines


def test_lines_written_in_pieces_by_several_threads_come_out_whole() -> None:
    under = io.StringIO()
    stream = WholeLines(under)
    start = threading.Barrier(4)

    def writer(name: str) -> None:
        start.wait()
        for index in range(500):
            stream.write(f'{{"from": "{name}", ')  # as `print` writes: the text, then the newline
            stream.write(f'"n": {index}}}')
            stream.write("\n")

    threads = [threading.Thread(target=writer, args=(f"t{n}",)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    lines = under.getvalue().splitlines()
    assert len(lines) == 2000
    assert all(
        line.startswith('{"from": "t') and line.endswith("}") and line.count("{") == 1 for line in lines
    )
    assert stream.encoding == under.encoding and stream.writable()


def test_a_write_of_several_lines_keeps_the_unfinished_one_for_later() -> None:
    under = io.StringIO()
    stream = WholeLines(under)
    stream.write("one\ntwo\nthr")
    assert under.getvalue() == "one\ntwo\n"
    stream.write("ee\n")
    assert under.getvalue() == "one\ntwo\nthree\n"
