"""Data: files -> raw records (readers) -> canonical records (formats) -> checked and loaded (validate).

Training commands call `medgpt.data.validate.load_records(files, kind)`; `medgpt data validate FILES`
prints every problem as `file:line: what is wrong`. Submodules are imported where used, so importing
this package stays cheap.
"""
