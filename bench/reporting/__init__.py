"""From cell folders to results: summary table, statistics, plots, report.md / report.html, the fidelity lab."""
