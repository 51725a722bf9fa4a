"""Long jobs over stored or archived history: rebuild the view, re-run handlers over a
window, import and export archives; ``job`` is their one convention for progress,
stopping and checkpoints."""
