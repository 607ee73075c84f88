# Tasks as shell functions: CELERIAC_TASKS_FILE=tasks.sh sh worker.sh
# task_<name> with '.', ':' and '-' as '_'; the same contract as an executable.

task_text_shout() {  # text.shout TEXT -> "TEXT!"
  printf '%s!' "$1" | tr '[:lower:]' '[:upper:]'
}
