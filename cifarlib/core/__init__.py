"""The ground every part stands on: where things are and what runs them (`runtime`, `ranks`), the
user's errors (`errors`), progress bars (`progress`), files written atomically (`files`), figures
(`figures`), when the command began (`clock`), the notebook runner (`notebook`) and the folders'
lazy names (`lazy`). It imports no other folder of cifarlib."""

from . import lazy

__getattr__, __dir__, __all__ = lazy.exports(__name__, {
    "errors": ["UserError", "show_errors_briefly"],
    "runtime": ["project_root", "resolve_path"],
})
