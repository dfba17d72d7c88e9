"""VQA synthesis: pool records -> long-document question/answer samples.

- ``synthesize``: jobs (task x segment), the resumable run, drops with reasons, the sample schema;
- ``teachers``: the OpenAI-compatible teacher (the recipe) and the teacher protocol;
- ``prompts``: the teacher prompts per task, answer formats and evidence sources;
- ``offline_teacher``: the rule-based fallback teacher (no server, for tests and demos);
- ``ocr_tasks``: the OCR-full and OCR-needle baselines.
"""
