"""The real-data study: research code, outside the installed packages and the app.

Federation vs pooling, the cost of DP, and distilled students, on public chest X-ray sets. Nothing
here is part of the packages or of the app bundle (``fab-include``), so editing the study never
changes the app hash that the sites accept. Run from the repository root::

    .venv/bin/python -m research.study all --config research/study/study.toml

Results: ``benchmarks/results/study.json`` and ``study.md`` (with its plots).
Modules: :mod:`research.study.cells` (settings, data preparation, the cells of each table),
``external``, ``privacy``, ``recipe``, ``sites`` (the tables' own parts), ``report``, ``plots``
and ``markdown`` (study.md and its figures), ``__main__`` (the command line).
"""
