/*
 * The one assertion macro of the C unit tests: CHECK(cond, fmt, ...)
 * records a failure with the file, line, condition and a message, and
 * carries on, so one run reports every broken check. A test's main()
 * ends with TEST_EXIT("name"), which prints a summary and returns 1 when
 * any check failed.
 */
#ifndef VDISK_TESTS_CHECK_H
#define VDISK_TESTS_CHECK_H

#include <stdio.h>

static int failures;

#define CHECK(cond, ...)                                                    \
    do {                                                                    \
        if (!(cond)) {                                                      \
            fprintf(stderr, "%s:%d: CHECK failed: %s: ", __FILE__,          \
                    __LINE__, #cond);                                       \
            fprintf(stderr, __VA_ARGS__);                                   \
            fputc('\n', stderr);                                            \
            failures++;                                                     \
        }                                                                   \
    } while (0)

#define TEST_EXIT(name)                                                     \
    do {                                                                    \
        if (failures) {                                                     \
            fprintf(stderr, "%s: %d check(s) failed\n", (name), failures);  \
            return 1;                                                       \
        }                                                                   \
        printf("%s: all checks passed\n", (name));                          \
        return 0;                                                           \
    } while (0)

#endif
