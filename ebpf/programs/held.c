/* agentkube-held: a tool call's first process, started and placed in its call cgroup before the command
 * is known (the runtime's warm pool), so that a call costs no process start and no cgroup move on its path.
 *
 * It becomes non-dumpable at once: it may wait in its cgroup for a long time, and a tool call running as
 * the same user must not ptrace it (or write its memory through /proc) to run code in a cgroup that a
 * later call will be given. Then it tells the runtime it is ready (one byte on fd 4, closed after) and
 * waits for its release: one byte on fd 5, written by whoever placed it (the node agent for a pooled
 * process, once the call's limits, write-ahead record and egress policy are in place; the runtime after
 * the agent's answer otherwise). EOF there means it is not needed (exit 125). Only then does it read its
 * command on fd 3: "cwd\0N\0NAME=VALUE\0 (N of them) argv0\0argv1\0...", up to EOF (the runtime writes it
 * before the release, so it is mostly in the pipe already: the release is the one wake-up before the exec).
 * It sets the N variables (the sandbox's own env, for a sandbox that adopted a warm pod started before it
 * existed), enters cwd (if not empty) and execs argv[0], searched in PATH as a shell would.
 * Exit codes as a shell's: 126 cannot enter cwd or exec, 127 command not found.
 *
 * Compiled statically (no dynamic loader runs before the prctl) at host or image setup time. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <unistd.h>

#define COMMAND_FD 3
#define READY_FD 4
#define RELEASE_FD 5
#define NOT_RELEASED 125
#define MAX_COMMAND (1 << 20)
#define MAX_ARGS 4096

static char command[MAX_COMMAND + 1];
static char *args[MAX_ARGS + 1];

int main(void) {
  if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0)
    return NOT_RELEASED;
  if (write(READY_FD, "r", 1) != 1)
    return NOT_RELEASED;
  close(READY_FD);
  char release;
  ssize_t released;
  do
    released = read(RELEASE_FD, &release, 1);
  while (released < 0 && errno == EINTR);
  if (released != 1)
    return NOT_RELEASED;
  close(RELEASE_FD);
  size_t length = 0;
  for (;;) {
    ssize_t got = read(COMMAND_FD, command + length, MAX_COMMAND - length);
    if (got < 0 && errno == EINTR)
      continue;
    if (got < 0)
      return NOT_RELEASED;
    if (got == 0)
      break;
    length += (size_t)got;
    if (length == MAX_COMMAND)
      return NOT_RELEASED;
  }
  close(COMMAND_FD);
  if (length == 0)
    return NOT_RELEASED;
  command[length] = '\0';
  int count = 0;
  char *cursor = command, *end = command + length;
  while (cursor < end && count < MAX_ARGS) {
    args[count++] = cursor;
    cursor += strlen(cursor) + 1;
  }
  args[count] = NULL;
  if (count < 3) /* cwd, the variables' count and at least argv[0] */
    return NOT_RELEASED;
  char *after = NULL;
  long variables = strtol(args[1], &after, 10);
  if (*args[1] == '\0' || *after != '\0' || variables < 0 || variables > count - 3)
    return NOT_RELEASED;
  for (long i = 0; i < variables; i++)
    if (strchr(args[2 + i], '=') == NULL || putenv(args[2 + i]) != 0)
      return NOT_RELEASED;
  char **argv = args + 2 + variables;
  if (args[0][0] && chdir(args[0]) != 0) {
    dprintf(2, "agentkube: cannot enter %s: %s\n", args[0], strerror(errno));
    return 126;
  }
  execvp(argv[0], argv);
  int error = errno;
  dprintf(2, "agentkube: %s: %s\n", argv[0], strerror(error));
  return error == ENOENT ? 127 : 126;
}
