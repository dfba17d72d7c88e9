"""The document pool: PDFs -> 144-DPI page images, layout blocks, sections, token counts.

- ``pdf``: open a PDF with limits, render pages, read the text layer, tables, outline, OCR fallback;
- ``layout``: label text blocks (title, section, paragraph, list, table, caption, header, footer);
- ``sections``: section structure with page spans (outline checked first), 8-15-page segment sampling;
- ``language``: document language detection;
- ``near_dup``: near-duplicate documents by MinHash over text shingles;
- ``records``: the typed manifest records (the pool's on-disk schema, read by synthesis and eval);
- ``build``: one document -> one record, a shard run (resumable), merge, report and statistics;
- ``synthetic_pdfs``: test/demo PDFs (sections, tables, headers/footers, TOC, broken files).

Nothing is imported here eagerly: PyMuPDF is only loaded by the modules that render.
"""
