"""Documents the RAG tests upload: PDFs written by pdfium itself."""

from __future__ import annotations

import ctypes
import io

import pypdfium2 as pdfium
import pypdfium2.raw as pdfium_c


def pdfium_pdf(pages: list[list[str]], line_gap: float = 16.0) -> bytes:
    """A PDF written by pdfium: one text object per line, Helvetica 12 pt; an empty
    string leaves a blank line (a paragraph gap)."""
    pdf = pdfium.PdfDocument.new()
    for lines in pages:
        page = pdf.new_page(612, 792)
        y = 740.0
        for line in lines:
            if line:
                obj = pdfium_c.FPDFPageObj_NewTextObj(pdf.raw, b"Helvetica", ctypes.c_float(12))
                utf16 = (line + "\0").encode("utf-16-le")
                buffer = ctypes.create_string_buffer(utf16, len(utf16))
                assert pdfium_c.FPDFText_SetText(
                    obj, ctypes.cast(buffer, ctypes.POINTER(ctypes.c_ushort))
                )
                pdfium_c.FPDFPageObj_Transform(obj, 1, 0, 0, 1, 72, y)
                pdfium_c.FPDFPage_InsertObject(page.raw, obj)
            y -= line_gap
        assert pdfium_c.FPDFPage_GenerateContent(page.raw)
        page.close()
    out = io.BytesIO()
    pdf.save(out)
    pdf.close()
    return out.getvalue()


def shared_stream_pdf(pages: int, line: str, repeat: int) -> bytes:
    """A hand-written PDF whose `pages` pages all draw one content stream that shows
    `line` `repeat` times: a few KB of file, pages x repeat x len(line) characters of
    text (the amplification of issue #8)."""
    text = line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
    stream = "BT /F1 1 Tf 0 0 Td " + f"({text}) Tj " * repeat + "ET"
    objects = [
        "<< /Type /Catalog /Pages 2 0 R >>",
        "<< /Type /Pages /Kids [{kids}] /Count {count} >>",
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
        f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream",
    ]
    kids = []
    for _ in range(pages):
        objects.append(
            "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
            "/Resources << /Font << /F1 3 0 R >> >> /Contents 4 0 R >>"
        )
        kids.append(f"{len(objects)} 0 R")
    objects[1] = objects[1].format(kids=" ".join(kids), count=pages)
    return pdf_file(objects, f"/Root 1 0 R /Size {len(objects) + 1}")


def pdf_file(objects: list[str], trailer: str) -> bytes:
    """A PDF file of the given objects (numbered from 1) with its cross-reference table
    and `trailer` (the dictionary's entries)."""
    body = b"%PDF-1.4\n"
    offsets = []
    for number, obj in enumerate(objects, start=1):
        offsets.append(len(body))
        body += f"{number} 0 obj\n{obj}\nendobj\n".encode("latin-1")
    xref = len(body)
    body += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    body += "".join(f"{offset:010d} 00000 n \n" for offset in offsets).encode()
    body += f"trailer\n<< {trailer} >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return body
