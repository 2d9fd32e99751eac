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
 * With `--forker` it is the runtime's forker instead: started once beside the warm pool, it makes held
 * processes by forking itself, a small static process (~0.3 ms of CPU a process, the runtime's side
 * included, against ~1.3 ms for a posix_spawn and exec from the runtime's interpreter). Each request on its control socket (fd 3) is one
 * byte with the new process's six descriptors attached (its 0-5, in order); the answer is the new pid as a
 * native int32, or -errno. The child is the runtime's (CLONE_PARENT: the runtime reaps it, and the node agent
 * sees the runtime as its parent, as for a spawned one), non-dumpable from its first instruction (the flag
 * belongs to the memory, which the fork copies) and the leader of a session of its own. The forker says it
 * is one with a byte "F" at its start (an older binary, which knows no forker, exits instead) and exits at
 * EOF of its control socket.
 *
 * Compiled statically (no dynamic loader runs before the prctl) at host or image setup time. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#define CONTROL_FD 3 /* the forker's socket to the runtime */
#define FORKED_FDS 6 /* a held process's descriptors 0-5, sent with each request to the forker */
#define COMMAND_FD 3
#define READY_FD 4
#define RELEASE_FD 5
#define NOT_RELEASED 125
#define MAX_COMMAND (1 << 20)
#define MAX_ARGS 4096

static char command[MAX_COMMAND + 1];
static char *args[MAX_ARGS + 1];

static int held(void) {
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

/* A forked held process: its descriptors 0-5 from the request (each first copied above them, so that none is
 * overwritten by an earlier one's dup2; the copies are close-on-exec and closed), then what held() does. */
static int forked(const int *fds) {
  int high[FORKED_FDS];
  close(CONTROL_FD);
  for (int i = 0; i < FORKED_FDS; i++)
    if ((high[i] = fcntl(fds[i], F_DUPFD_CLOEXEC, FORKED_FDS)) < 0)
      return NOT_RELEASED;
  for (int i = 0; i < FORKED_FDS; i++)
    if (dup2(high[i], i) < 0)
      return NOT_RELEASED;
  for (int i = 0; i < FORKED_FDS; i++) {
    close(high[i]);
    if (fds[i] >= FORKED_FDS)
      close(fds[i]);
  }
  if (setsid() < 0)
    return NOT_RELEASED;
  return held();
}

static int forker(void) {
  if (write(CONTROL_FD, "F", 1) != 1)
    return NOT_RELEASED;
  for (;;) {
    char byte;
    int fds[FORKED_FDS], count = 0;
    union {
      struct cmsghdr align;
      char buffer[CMSG_SPACE(sizeof fds)];
    } control;
    struct iovec part = {.iov_base = &byte, .iov_len = 1};
    struct msghdr message = {.msg_iov = &part, .msg_iovlen = 1, .msg_control = control.buffer,
                             .msg_controllen = sizeof control.buffer};
    ssize_t got = recvmsg(CONTROL_FD, &message, MSG_CMSG_CLOEXEC);
    if (got < 0 && errno == EINTR)
      continue;
    if (got <= 0)
      return 0; /* the runtime is gone */
    for (struct cmsghdr *header = CMSG_FIRSTHDR(&message); header; header = CMSG_NXTHDR(&message, header)) {
      if (header->cmsg_level != SOL_SOCKET || header->cmsg_type != SCM_RIGHTS)
        continue;
      size_t received = (header->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      for (size_t i = 0; i < received; i++) {
        int fd;
        memcpy(&fd, CMSG_DATA(header) + i * sizeof fd, sizeof fd);
        if (count < FORKED_FDS)
          fds[count++] = fd;
        else
          close(fd);
      }
    }
    int32_t answer = -EINVAL;
    if (count == FORKED_FDS && !(message.msg_flags & MSG_CTRUNC)) {
      long pid = syscall(SYS_clone, CLONE_PARENT | SIGCHLD, 0, 0, 0, 0);
      if (pid == 0)
        _exit(forked(fds));
      answer = pid < 0 ? -errno : (int32_t)pid;
    }
    for (int i = 0; i < count; i++)
      close(fds[i]);
    if (write(CONTROL_FD, &answer, sizeof answer) != (ssize_t)sizeof answer)
      return 0;
  }
}

int main(int argc, char **argv) {
  if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0)
    return NOT_RELEASED;
  if (argc > 1 && strcmp(argv[1], "--forker") == 0)
    return forker();
  return held();
}
