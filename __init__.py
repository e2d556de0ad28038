"""adakd: offline knowledge distillation for LLMs.

The installed distribution provides this one import name. Its parts: `adakd.storage` (the cache format),
`adakd.pipeline` (stage one, the teacher), `adakd.trainer` (stage two, the student), `adakd.common`
(what both stages need), `adakd.cli` (the commands). The public Python API for other trainers is documented
in docs/python-api.md.
"""
