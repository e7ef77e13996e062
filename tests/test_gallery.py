"""The HTML gallery."""
import html.parser
import os

import numpy as np
import pytest

from videolm import gallery, media


class _Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.links, self.text = [], []

    def handle_starttag(self, tag, attrs):
        self.links += [value for name, value in attrs if name in ("src", "href")]

    def handle_data(self, data):
        self.text.append(data)


def parse(index_path):
    parser = _Links()
    with open(index_path, encoding="utf-8") as f:
        parser.feed(f.read())
    return parser.links, "".join(parser.text)


def assert_links_exist(index_path):
    links, _ = parse(index_path)
    assert links
    for link in links:
        path = os.path.join(os.path.dirname(index_path), link)
        assert os.path.isfile(path) and os.path.getsize(path) > 0, link
    return links


def test_gallery_writes_media_captions_and_tables(tmp_path):
    rng = np.random.default_rng(0)
    video = rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    audio = (0.3 * np.sin(np.linspace(0, 200, 8000))).astype(np.float32)
    page = gallery.Gallery(tmp_path, "test <gallery>", "about & such", display_size=64)
    page.add_section("inputs and outputs")
    written = page.add_row("row 1", [
        gallery.Cell("input", video=video, audio=audio, fps=8, sample_rate=16000, text="a <red> circle",
                     scores={"caption": {"exact_match": 1.0}, "lag_ms": None}),
        gallery.Cell("generated", image=video[0], text="first frame"),
        gallery.Cell("sound", audio=audio, sample_rate=16000),
    ])
    page.add_table("summary", {"clips": {"caption": {"color": 0.5}}, "shuffled": {"caption": {"color": 0.125}}})
    index = page.write()
    assert index == os.path.join(tmp_path, "index.html")
    links = assert_links_exist(index)
    assert set(written) <= set(links) and len(written) == 3
    assert [os.path.splitext(w)[1] for w in written] == [".mp4", ".png", ".wav"]
    _, text = parse(index)
    for expected in ("test <gallery>", "a <red> circle", "caption / exact_match", "caption / color",
                     "0.125", "shuffled", "first frame"):
        assert expected in text
    clip = media.read_video(os.path.join(tmp_path, written[0]))
    assert clip.video.shape == (5, 64, 64, 3)  # upscaled 4x to the display size
    assert clip.audio is not None and clip.sample_rate == 16000
    assert "<red>" not in open(index, encoding="utf-8").read()  # escaped


def test_bad_cells_raise(tmp_path):
    page = gallery.Gallery(tmp_path, "t")
    video = np.zeros((2, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="needs a video, an image or audio"):
        page.add_row("r", [gallery.Cell("empty")])
    with pytest.raises(ValueError, match="needs fps"):
        page.add_row("r", [gallery.Cell("v", video=video)])
    with pytest.raises(ValueError, match="sample_rate"):
        page.add_row("r", [gallery.Cell("a", audio=np.zeros(10, np.float32))])
    with pytest.raises(ValueError, match="at least one cell"):
        page.add_row("r", [])


def test_format_value():
    assert gallery.format_value(None) == "–"
    assert gallery.format_value(np.float32(0.123456)) == "0.123"
    assert gallery.format_value(3) == "3"
    assert gallery.format_value(12345.6) == "12346"
    assert gallery.flatten_scores({"a": {"b": 1, "c": {"d": 2}}}) == {"a / b": 1, "a / c / d": 2}
