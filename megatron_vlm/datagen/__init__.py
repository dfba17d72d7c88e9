"""Offline data generation: the document pool (PDFs -> page images, layout blocks, token counts).

Modules, one job each:

- ``pdf``: open a PDF with limits, render pages, read the text layer, tables, outline, OCR fallback;
- ``layout``: label text blocks (title, section, paragraph, list, table, caption, header, footer);
- ``sections``: section structure with page spans, and 8-15-page segment sampling;
- ``language``: light document language detection;
- ``inputs``: input discovery, ``--shard I/N`` selection, exclusion lists;
- ``storage``: atomic file writes and append-only JSONL with completion markers;
- ``workers``: a process pool that kills a document's worker when it overruns its time limit;
- ``records``: the typed manifest records (the pool's on-disk schema);
- ``pool``: one document -> one record, a shard run (resumable), merge, report and statistics;
- ``synthetic_pdfs``: test/demo PDFs (sections, tables, headers/footers, TOC, broken files).

Nothing is imported here eagerly: PyMuPDF is only loaded by the modules that render.
"""
