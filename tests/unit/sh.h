/*
 * sh(): runs a shell command built printf-style (the peers a unit test
 * consults: qemu-img, qemu-io, rm) and returns its exit status, -1 when
 * it did not exit normally (a signal, or no shell) and for a command
 * longer than 2 KiB, which is not run (build commands from short paths).
 */
#ifndef VDISK_TESTS_SH_H
#define VDISK_TESTS_SH_H

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>

static int sh(const char *fmt, ...) __attribute__((format(printf, 1, 2),
                                                    unused));
static int sh(const char *fmt, ...)
{
    char cmd[2048];
    va_list ap;
    int st;

    va_start(ap, fmt);
    st = vsnprintf(cmd, sizeof(cmd), fmt, ap);
    va_end(ap);
    if (st < 0 || (size_t)st >= sizeof(cmd)) {
        fprintf(stderr, "sh: command too long: %.80s...\n", cmd);
        return -1;
    }
    st = system(cmd);
    return st != -1 && WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

#endif
