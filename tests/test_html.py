"""report.html: the Markdown the report writes, rendered with its images embedded (analysis/html.py)."""

from __future__ import annotations

import base64

from ncssl_tune.analysis.html import inline, to_html

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16

MD = """# Collapse analysis: vicreg

Parent run `abc`. 4 trials
(2 finished); **bold** and `a**b`.

> **Warning: fewer than 8 trials** (4).
> treat every row as anecdotal.

| rank ρ | predictor | p |
|---|---|---|
| 1 | lidar | 0.01 |
| 2 | a<b | – |

### Spectra

![Spectra](spectra.png)

### Collapse map

![Collapse map](missing.png)
"""


def test_tables_headings_and_quotes_become_html(tmp_path):
    (tmp_path / "spectra.png").write_bytes(PNG)
    page = to_html(MD, tmp_path, title="t")
    assert "<h1>Collapse analysis: vicreg</h1>" in page and "<h3>Spectra</h3>" in page
    assert "<p>Parent run <code>abc</code>. 4 trials (2 finished); <strong>bold</strong> and <code>a**b</code>.</p>" in page
    assert "<blockquote><p><strong>Warning: fewer than 8 trials</strong> (4). treat every row" in page
    assert "<thead><tr><th>rank ρ</th><th>predictor</th><th>p</th></tr></thead>" in page
    assert "<tr><td>2</td><td>a&lt;b</td><td>–</td></tr>" in page  # escaped, not markup
    assert "|---|" not in page and "| 1 |" not in page


def test_images_are_embedded_and_a_missing_one_says_so(tmp_path):
    (tmp_path / "spectra.png").write_bytes(PNG)
    page = to_html(MD, tmp_path)
    assert f'src="data:image/png;base64,{base64.b64encode(PNG).decode()}"' in page
    assert "(image missing.png not found)" in page and "](spectra.png)" not in page


def test_inline_escapes_before_formatting():
    assert inline("<b>x</b> **y**") == "&lt;b&gt;x&lt;/b&gt; <strong>y</strong>"
