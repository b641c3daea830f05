"""Document extraction for RAG ingest (engine.rag.extract) on real files the tests build:
PDFs written by pdfium itself and by hand, HTML, Markdown and text in several encodings."""

from __future__ import annotations

import random
import threading

import pytest
from documents import pdf_file, pdfium_pdf

from engine.errors import InvalidRequest
from engine.rag.extract import extract
from engine.rag.formats.pdf import _join_lines

# --- PDF builders ---------------------------------------------------------------------


def _pdf_string(text: str) -> str:
    return "(" + text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)") + ")"


def handmade_pdf(
    pages: list[list[str]], *, title: str | None = None, encrypt: bool = False
) -> bytes:
    """A minimal PDF written byte by byte: catalog, page tree, Helvetica, one content
    stream per page, an optional /Info title and an optional /Encrypt dictionary whose
    password check can never pass (so it cannot be opened without a password)."""
    objects: list[str] = [
        "<< /Type /Catalog /Pages 2 0 R >>",
        "",  # the page tree, once the page numbers are known
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    kids = []
    for lines in pages:
        ops = ["BT", "/F1 12 Tf", "14 TL", "72 720 Td"]
        for line in lines:
            ops.append(f"{_pdf_string(line)} Tj T*")
        ops.append("ET")
        stream = "\n".join(ops)
        objects.append(
            f"<< /Length {len(stream.encode('latin-1'))} >>\nstream\n{stream}\nendstream"
        )
        content = len(objects)
        objects.append(
            "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
            f"/Resources << /Font << /F1 3 0 R >> >> /Contents {content} 0 R >>"
        )
        kids.append(f"{len(objects)} 0 R")
    objects[1] = f"<< /Type /Pages /Kids [{' '.join(kids)}] /Count {len(kids)} >>"
    trailer = f"/Root 1 0 R /Size {len(objects) + 1}"
    if title is not None:
        objects.append(f"<< /Title {_pdf_string(title)} >>")
        trailer += f" /Info {len(objects)} 0 R"
    if encrypt:
        o, u = "11" * 32, "22" * 32
        objects.append(f"<< /Filter /Standard /V 1 /R 2 /O <{o}> /U <{u}> /P -4 >>")
        trailer += f" /Encrypt {len(objects)} 0 R /ID [<{'ab' * 16}> <{'ab' * 16}>]"
        objects[len(objects) - 1] = objects[-1]
    return pdf_file(objects, trailer)


def _error(filename: str, data: bytes, content_type: str | None = None) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        extract(filename, data, content_type)
    error = caught.value
    assert error.param == "files"
    assert filename in error.message
    return error


# --- PDF ------------------------------------------------------------------------------


def test_pdf_one_section_per_page_with_page_numbers() -> None:
    data = pdfium_pdf([["Alpha first page."], ["Bravo second page."], ["Charlie third page."]])
    result = extract("report.pdf", data)
    assert result.format == "pdf"
    assert [(s.page, s.text) for s in result.sections] == [
        (1, "Alpha first page."),
        (2, "Bravo second page."),
        (3, "Charlie third page."),
    ]
    assert result.title is None  # pdfium writes no /Title


def test_pdf_blank_page_is_skipped_but_numbering_kept() -> None:
    data = pdfium_pdf([["Alpha."], [], ["Charlie."]])
    assert [s.page for s in extract("gap.pdf", data).sections] == [1, 3]


def test_pdf_text_is_dehyphenated_and_paragraphs_kept() -> None:
    data = pdfium_pdf(
        [
            [
                "Text extraction is an exam-",
                "ple of careful work that",
                "spans several lines.",
                "",
                "A second paragraph follows.",
            ]
        ]
    )
    (section,) = extract("prose.pdf", data).sections
    assert section.text == (
        "Text extraction is an example of careful work that spans several lines.\n\n"
        "A second paragraph follows."
    )


def test_pdf_title_from_metadata_and_lines_joined() -> None:
    data = handmade_pdf(
        [["First line of page one", "continues here."], ["Page two (with parens)."]],
        title="Annual Report 2024",
    )
    result = extract("annual.pdf", data)
    assert result.title == "Annual Report 2024"
    assert [(s.page, s.text) for s in result.sections] == [
        (1, "First line of page one continues here."),
        (2, "Page two (with parens)."),
    ]


def test_line_join_rules() -> None:
    assert _join_lines(["an exam-", "ple"]) == "an example"
    assert _join_lines(["an exam\ufffe", "ple"]) == "an example"
    assert _join_lines(["Vitamin B-", "12 levels"]) == "Vitamin B- 12 levels"
    assert _join_lines(["well-", "Known"]) == "well- Known"
    assert _join_lines(["one", "two"]) == "one two"


def test_pdf_recognised_by_content_whatever_the_name() -> None:
    data = pdfium_pdf([["Sniffed content."]])
    for name in ("download", "notes.txt", "page.html"):
        assert extract(name, data).format == "pdf"


@pytest.mark.parametrize("cut", [0.5, 0.9, -12])
def test_truncated_pdf_is_rejected_naming_the_file(cut: float) -> None:
    data = pdfium_pdf([["Alpha."], ["Bravo."], ["Charlie."]])
    end = int(len(data) * cut) if cut > 0 else len(data) + int(cut)
    error = _error("broken.pdf", data[:end])
    assert error.code == "invalid_document"
    assert "corrupt" in error.message


def test_garbled_pdf_is_rejected() -> None:
    noise = random.Random(1).randbytes(2000)
    error = _error("noise.pdf", b"%PDF-1.7\n" + noise + b"\nstartxref\n9\n%%EOF\n")
    assert error.code == "invalid_document"
    assert "corrupt" in error.message


def test_encrypted_pdf_is_rejected() -> None:
    data = handmade_pdf([["Secret."]], encrypt=True)
    error = _error("locked.pdf", data)
    assert error.code == "invalid_document"
    assert "encrypted" in error.message


def test_pdf_without_text_is_rejected() -> None:
    error = _error("scan.pdf", pdfium_pdf([[], []]))
    assert error.code == "invalid_document"
    assert "no extractable text" in error.message


def test_pdf_name_without_pdf_content_is_rejected() -> None:
    error = _error("fake.pdf", b"just some words")
    assert "not a PDF" in error.message


def test_pdf_extraction_from_threads() -> None:
    """pdfium is not thread-safe; the extractor serialises it."""
    data = pdfium_pdf([[f"Page {n} text."] for n in range(1, 21)])
    failures: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(5):
                assert len(extract("t.pdf", data).sections) == 20
        except BaseException as exc:  # collected for the main thread
            failures.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


# --- HTML -----------------------------------------------------------------------------

PAGE = b"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Field Guide &amp; Notes</title>
<style>.secret-style { color: red }</style>
<script>var secretScript = 1;</script></head>
<body>
<header><nav><a href="/">Home</a> <a href="/about">NavAbout</a></nav>
  <h1>SiteBanner</h1></header>
<div role="navigation">RoleNavigation</div>
<main><article>
  <header><h1>Birds &eacute;t&eacute;</h1></header>
  <p>Birds   are
     warm-blooded&nbsp;vertebrates.</p>
  <h2>Habitat</h2>
  <p>Forests<br>and wetlands.</p>
  <ul><li>Owls</li><li>Herons<ul><li>Grey heron</li></ul></li></ul>
  <table><tr><th>Bird</th><th>Weight</th></tr><tr><td>Owl</td><td>1 kg</td></tr></table>
  <h3>Nesting</h3>
  <p>Nests are built in spring.</p>
  <div aria-hidden="true">HiddenFromReaders</div>
  <aside>AsideRelated</aside>
  <form><input name="q"><button>SearchButton</button></form>
  <h2>Diet</h2>
  <pre>seeds
  insects</pre>
</article></main>
<footer>FooterCopyright 2024</footer>
<noscript>NoscriptText</noscript>
</body></html>"""


def test_html_drops_scripts_styles_navigation_and_chrome() -> None:
    result = extract("birds.html", PAGE)
    text = "\n".join(s.text for s in result.sections)
    for hidden in (
        "secret",
        "NavAbout",
        "Home",
        "SiteBanner",
        "RoleNavigation",
        "HiddenFromReaders",
        "AsideRelated",
        "SearchButton",
        "FooterCopyright",
        "NoscriptText",
        "color",
    ):
        assert hidden not in text
    assert result.format == "html"
    assert result.title == "Field Guide & Notes"


def test_html_headings_make_sections_with_paths() -> None:
    sections = extract("birds.html", PAGE).sections
    assert [s.heading for s in sections] == [
        "Birds été",
        "Birds été > Habitat",
        "Birds été > Habitat > Nesting",
        "Birds été > Diet",
    ]
    assert sections[0].text == "Birds are warm-blooded vertebrates."
    assert sections[1].text == (
        "Forests\nand wetlands.\n\n- Owls\n- Herons\n  - Grey heron\n\nBird | Weight\nOwl | 1 kg"
    )
    assert sections[2].text == "Nests are built in spring."
    assert sections[3].text == "seeds\n  insects"  # <pre> keeps its layout


def test_html_title_falls_back_to_first_h1_and_meta_charset_is_used() -> None:
    page = '<html><head><meta charset="iso-8859-1"></head><body><h1>Caf\xe9</h1><p>cr\xe8me</p>'
    result = extract("cafe.htm", page.encode("latin-1"))
    assert result.title == "Café"
    assert [(s.heading, s.text) for s in result.sections] == [("Café", "crème")]


def test_html_title_fallback_ignores_svg_titles_and_the_site_banner() -> None:
    page = (
        b"<body><svg><title>icon</title></svg><header><h1>SiteName</h1></header>"
        b"<main><h1>Real Title</h1><p>Body.</p></main></body>"
    )
    result = extract("page.html", page)
    assert result.title == "Real Title"
    assert [(s.heading, s.text) for s in result.sections] == [("Real Title", "Body.")]


def test_html_sniffed_under_a_text_name() -> None:
    result = extract("saved.txt", b"<!doctype html><title>T</title><p>Body <b>text</b></p>")
    assert (result.format, result.title, result.sections[0].text) == ("html", "T", "Body text")


def test_html_with_only_scripts_is_empty() -> None:
    error = _error("blank.html", b"<html><body><script>x()</script><nav>menu</nav></body></html>")
    assert error.code == "invalid_document"
    assert "empty" in error.message


# --- Markdown -------------------------------------------------------------------------

NOTES = """---
title: "Release Notes"
tags: [a, b]
---
Intro with a [link](https://example.com) and ![a diagram](d.png), **bold**, _emphasis_,
and a snake_case_name.

Getting Started
===============

Install it first.

```bash
# not a heading
pip install fusion
```

## Configuration ##

- set *one*
- set two

Advanced
--------
Tuning `the **raw** knobs`.

***

| key | value |
|-----|-------|
| a   | 1     |
"""


def test_markdown_sections_front_matter_and_code() -> None:
    result = extract("NOTES.md", NOTES.encode())
    assert result.format == "markdown"
    assert result.title == "Release Notes"
    assert [(s.heading, s.text) for s in result.sections] == [
        (
            None,
            "Intro with a link and a diagram, bold, emphasis,\nand a snake_case_name.",
        ),
        ("Getting Started", "Install it first.\n\n# not a heading\npip install fusion"),
        ("Getting Started > Configuration", "- set one\n- set two"),
        (
            "Getting Started > Advanced",
            "Tuning the **raw** knobs.\n\n| key | value |\n| a   | 1     |",
        ),
    ]
    assert "tags" not in "".join(s.text for s in result.sections)


def test_markdown_title_falls_back_to_first_h1() -> None:
    result = extract("x.markdown", b"Lead.\n\n# Main Title\n\nBody.\n\n## Sub\n\nMore.\n")
    assert result.title == "Main Title"
    assert [s.heading for s in result.sections] == [None, "Main Title", "Main Title > Sub"]


def test_markdown_thematic_break_is_not_a_heading() -> None:
    result = extract("x.md", b"One.\n\n---\n\nTwo.\n")
    assert [(s.heading, s.text) for s in result.sections] == [(None, "One.\n\nTwo.")]


# --- Plain text -----------------------------------------------------------------------

FRENCH = "Café crème brûlée à la française.\n\nDeuxième paragraphe, déjà vu."


@pytest.mark.parametrize(
    ("encoding", "prefix"),
    [
        ("utf-8", b""),
        ("utf-8", b"\xef\xbb\xbf"),
        ("utf-16-le", b"\xff\xfe"),
        ("utf-16-be", b"\xfe\xff"),
        ("latin-1", b""),
    ],
)
def test_text_encodings(encoding: str, prefix: bytes) -> None:
    result = extract("french.txt", prefix + FRENCH.encode(encoding))
    assert result.format == "text"
    assert [s.text for s in result.sections] == [FRENCH]


def test_text_declared_charset_is_used() -> None:
    russian = "Привет, мир. Это проверка кодировки."
    result = extract("ru.txt", russian.encode("cp1251"), "text/plain; charset=windows-1251")
    assert result.sections[0].text == russian


def test_text_newlines_normalised_and_paragraphs_kept() -> None:
    result = extract("README", b"line one\r\nline two   \r\n\r\n\r\n\r\nnext\rpara\n")
    assert result.format == "text"
    assert result.sections[0].text == "line one\nline two\n\nnext\npara"


def test_unknown_text_extension_is_read_as_text() -> None:
    assert extract("data.csv", b"a,b\n1,2\n").sections[0].text == "a,b\n1,2"


# --- Refusals -------------------------------------------------------------------------


def test_png_is_unsupported() -> None:
    png = b"\x89PNG\r\n\x1a\n" + bytes(64)
    for name in ("photo.png", "photo"):
        error = _error(name, png)
        assert error.code == "unsupported_format"


def test_docx_is_unsupported() -> None:
    error = _error("letter.docx", b"PK\x03\x04" + bytes(40))
    assert error.code == "unsupported_format"
    assert ".docx" in error.message


@pytest.mark.parametrize("name", ["blob", "blob.txt", "blob.dat", "blob.md", "blob.html"])
def test_random_binary_is_unsupported(name: str) -> None:
    error = _error(name, random.Random(7).randbytes(4096))
    assert error.code == "unsupported_format"
    assert "binary" in error.message


@pytest.mark.parametrize("name", ["empty.txt", "empty.pdf", "empty.md", "empty.html", "empty"])
@pytest.mark.parametrize("data", [b"", b" \n\t\r\n"])
def test_empty_documents_are_rejected(name: str, data: bytes) -> None:
    error = _error(name, data)
    assert error.code == "invalid_document"
    assert "empty" in error.message


def test_whitespace_only_markdown_sections_are_empty() -> None:
    error = _error("only-headings.md", b"# A\n\n## B\n")
    assert error.code == "invalid_document"


# --- Format choice --------------------------------------------------------------------


def test_text_mentioning_the_pdf_signature_is_not_a_pdf() -> None:
    result = extract("about.md", b"# PDFs\n\nEvery file starts with %PDF-1.7 and more.\n")
    assert result.format == "markdown"
    assert result.sections[0].text == "Every file starts with %PDF-1.7 and more."


def test_html_under_a_pdf_name_is_read_as_html() -> None:
    result = extract("invoice.pdf", b"<html><body><p>Session expired</p></body></html>")
    assert (result.format, result.sections[0].text) == ("html", "Session expired")


def test_content_type_chooses_the_format_without_an_extension() -> None:
    result = extract("upload", b"# Title\n\nBody.\n", "text/markdown; charset=utf-8")
    assert (result.format, result.title) == ("markdown", "Title")
    assert extract("upload", b"# Title\n\nBody.\n").format == "text"


def test_utf8_cut_inside_the_last_character_is_not_mistaken_for_a_code_page() -> None:
    data = "Déjà vu, naïve café é".encode()[:-1]
    assert extract("cut.txt", data).sections[0].text == "Déjà vu, naïve café"
