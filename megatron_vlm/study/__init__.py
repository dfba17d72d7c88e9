"""The paper's ablation studies, one command each (``python -m megatron_vlm.study STUDY ...``):
``ablations`` (variants and their claims), ``commands`` (the tool command lines), ``checks`` (built data
and saved configs against the claims), ``runner`` (resumable data -> train -> eval -> compare),
``smoke`` (tiny CPU inputs)."""
