"""Per-format text extraction for the RAG provider; `engine.rag.extract` picks the format."""
