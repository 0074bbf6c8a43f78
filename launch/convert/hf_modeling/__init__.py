"""Loom's own Hugging Face modeling code, copied into exports that need it (`trust_remote_code`).

`configuration_loom.py`, `modeling_loom.py`, `techniques_loom.py` (LCM, SCR) and `cache_loom.py` (the KV
cache with the techniques' state) are self-contained (torch + transformers only): they re-implement
Loom's network with LCM, SCR and CMR so that an export runs without the loom package.
"""

from pathlib import Path

HERE = Path(__file__).resolve().parent
FILES = ("configuration_loom.py", "modeling_loom.py", "techniques_loom.py", "cache_loom.py")
