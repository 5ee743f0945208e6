"""Evidence that a release is de-identified: the leak scan, the QC report and the audit table.

* :mod:`deidflow.qc.identifiers` – the original identifying values each stage met (restricted);
* :mod:`deidflow.qc.leakscan` – search every release file for them (``deidflow verify``);
* :mod:`deidflow.qc.captions` – the QC pictures' captions (their fixed wording is not searched);
* :mod:`deidflow.qc.report` – the self-contained HTML report in ``derivatives/deidflow/qc``;
* :mod:`deidflow.qc.audit` – ``restricted/audit/*.jsonl`` consolidated into ``audit.parquet``.
"""
