"""The final report of `python -m search.run` (runs/<study-name>/report.md and .html).

content.py decides what the report says (blocks), sections.py the parts that look beyond the
study's own trials (other studies on the same data, augmentation, a frozen backbone),
figures.py and plots.py draw the figures, render.py turns blocks into Markdown and
self-contained HTML, dashboard.py attaches the files and a note for optuna-dashboard.
"""
