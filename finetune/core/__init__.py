"""What every stage imports: typed params, the command runner, errors, files, progress, the file lock
and the process guard (leaves: nothing here imports the rest of the project but the arch table)."""
