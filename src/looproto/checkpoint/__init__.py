"""Checkpoints: `CheckpointManager` (`tf.train.CheckpointManager`'s surface on orbax).

A checkpoint of a root object (a `Module`, a variable, or a dict/list of them)
holds every variable reachable from it, keyed by its path from
`variables_by_path` (e.g. `"model/layers/0/w"`), plus the JSON state of every
reachable object that follows the iterator-state protocol (callable
`get_state()` / `set_state(state)` with JSON-serialisable data) and of every
`numpy.random.Generator`. No pickle is used anywhere.

On disk, `<directory>/<step>/` is an orbax checkpoint with two items: `state`
(the arrays, OCDBT; left out when there are none) and `meta` (human-readable
JSON: format version, step, each array's shape, dtype and CRC-32, and the
objects' states). A step directory appears only when complete (orbax renames a
temporary directory on commit), and temporary directories left by a crash are
deleted by the next process that takes over the directory.

One process owns a directory at a time: a manager that is not `read_only` takes its
lock (`<directory>/.looproto-lock`: host, process id, start time) until `close()`,
so a second writer fails at once naming the first, and a dead owner's lock is taken
over. Only the owner deletes, renames or cleans; readers (`read_only=True`,
`read_metadata`, `checkpoints_iterator`, an evaluator beside the trainer) change
nothing and tolerate steps the owner deletes while they read.

A leaf that a backend marks `looproto.backends.Unsaveable` (framework state a
checkpoint cannot hold) makes a save fail, naming its path. A variable of the tree
inside an object's state (the variables a Keras optimizer was built for) is stored as a
reference to its path.

Restores are all-or-nothing: the stored tree is compared with the live one and
every array is read and checked against its recorded shape, dtype and CRC-32
before any variable is written, because orbax silently returns garbage for
overwritten bytes and an empty tree for a deleted item directory. A checkpoint
that `restore_or_initialize()` finds damaged is renamed to
`<step>.corrupted-<time>` (kept for inspection, never listed or deleted) and the
one before it is restored.

A live path the checkpoint lacks is refused, with the fix in the message, unless it
matches `allow_missing` (for checkpoints written before that state was captured: it
then keeps its live value). Object states marked `restore_first` are set before the
comparison, since they create variables (a lazily built Keras optimizer's slots).

`max_to_keep` is applied by looproto, not orbax: older checkpoints are deleted
only once the newer ones being kept have been committed and pass a metadata check
(their JSON item and array index are complete), so a failed or damaged save never
costs the checkpoint before it. A deletion renames the step directory away first,
so a crash during it never leaves a half-deleted step that looks committed.

Asynchronous saves (`enable_async=True`) are waited for when the interpreter
exits normally (end of the script, `sys.exit`, an uncaught exception), before
Python shuts down the thread pools orbax needs; orbax alone loses them there.
`os._exit` and signals that kill the process still lose a save that is under
way (the previous checkpoint stays the newest). The `Controller` also waits for
them (`sync()`) at the end of every `train()`.

orbax (and through it JAX) is imported only when a manager is created.

The package's files: `_manager.py` (`CheckpointManager`), `_state.py` (what a
checkpoint holds: arrays, object states as JSON, CRC-32s, and the all-or-nothing
restore checks), `_live.py` (the live tree's side of a restore: `restore_first` states,
`allow_missing`), `_files.py` (the directory layout: listing, deletion, quarantine),
`_reading.py` (`latest_step`, `read_metadata`, `checkpoints_iterator`),
`_processes.py` (agreement between the processes of a multi-process run), `_lock.py`
(who owns the directory) and `_exit.py` (asynchronous saves waited for, and open
managers closed, at exit).
"""

from looproto.checkpoint._manager import CheckpointManager as CheckpointManager
from looproto.checkpoint._reading import checkpoints_iterator as checkpoints_iterator
from looproto.checkpoint._reading import latest_step as latest_step
from looproto.checkpoint._reading import read_metadata as read_metadata

__all__ = ["CheckpointManager", "checkpoints_iterator", "latest_step", "read_metadata"]
