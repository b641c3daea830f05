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
