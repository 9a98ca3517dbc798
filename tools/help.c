/*
 * Help that comes from the command table (util.c's cli_commands[]):
 * `vdisk CMD --help` and `vdisk help CMD` for the commands that parse with
 * cli_getopt() (their synopsis, then every option under all its
 * spellings), and the hidden `vdisk --list-options CMD`, a
 * machine-readable dump of the same getopt tables that
 * tests/cli/man.sh compares with the help and the man pages, and that
 * the bash completion (contrib/vdisk.bash) completes options from. Both
 * read the short option string and the long-option table the parser
 * uses, so neither can list an option the parser does not take, nor
 * miss one it does.
 */
#include <ctype.h>
#include <stdio.h>
#include <string.h>

#include "util.h"

/* One option with all its spellings: a short letter (0 if none) and the
 * long options that return the same value. */
typedef struct help_opt {
    int val;
    char letter;
    int has_arg;        /* no_argument, required_argument, optional_argument */
} help_opt;

/* How many ':' follow @p's letter in a getopt string. */
static int short_arg(const char *p)
{
    return p[1] != ':' ? no_argument
           : p[2] == ':' ? optional_argument : required_argument;
}

/*
 * Calls @fn once per option of @c, in the order of its short string and
 * then of its long-option table; a long option that returns a short
 * letter's value, or the value of an earlier long option (--pid-file and
 * --pidfile), belongs to that option.
 */
static void foreach_option(const cli_command *c,
                           void (*fn)(const cli_command *c,
                                      const help_opt *o, void *opaque),
                           void *opaque)
{
    const char *s = c->short_opts ? c->short_opts : "";
    const struct option *l = c->long_opts;

    for (const char *p = s; *p; p++) {
        if (*p == ':' || *p == '+' || *p == '-') {
            continue;
        }
        help_opt o = { (unsigned char)*p, *p, short_arg(p) };
        fn(c, &o, opaque);
    }
    for (size_t i = 0; l && l[i].name; i++) {
        bool seen = l[i].val > 0 && l[i].val < 256 &&
                    l[i].val != ':' && strchr(s, l[i].val);
        for (size_t j = 0; j < i && !seen; j++) {
            seen = l[j].val == l[i].val;
        }
        if (!seen) {
            help_opt o = { l[i].val, 0, l[i].has_arg };
            fn(c, &o, opaque);
        }
    }
}

/* The argument's name as the synopsis writes it ("-f fmt",
 * "--output=ofmt", "--size N", "-r [leaks | all]"), or "ARG". */
static void arg_name(const cli_command *c, const char *spelling,
                     char *buf, size_t len)
{
    const char *syn = c->synopsis, *p = syn;
    size_t n = strlen(spelling);

    snprintf(buf, len, "ARG");
    while ((p = strstr(p, spelling)) != NULL) {
        const char *q = p + n;
        bool start = p == syn || strchr(" [(|", p[-1]);

        p = q;
        if (!start || (*q != ' ' && *q != '=')) {
            continue;
        }
        q++;
        /* "-r [leaks | all]": the choices, without the spaces. */
        if (*q == '[') {
            size_t o = 0;
            for (q++; *q && *q != ']' && o + 1 < len; q++) {
                if (*q != ' ') {
                    buf[o++] = *q;
                }
            }
            buf[o] = 0;
            if (*q == ']' && o > 0) {
                return;
            }
            snprintf(buf, len, "ARG");
            continue;
        }
        size_t w = 0;
        while (q[w] && (isalnum((unsigned char)q[w]) || q[w] == '_')) {
            w++;
        }
        if (w > 0 && w < len) {
            snprintf(buf, len, "%.*s", (int)w, q);
            return;
        }
    }
}

static void print_option(const cli_command *c, const help_opt *o,
                         void *opaque)
{
    const struct option *l = c->long_opts;
    char arg[32] = "ARG";
    const char *sep = "  ";
    bool any_long = false;

    (void)opaque;
    if (o->letter) {
        char spelling[3] = { '-', o->letter, 0 };
        printf("  -%c", o->letter);
        arg_name(c, spelling, arg, sizeof(arg));
        sep = ", ";
    } else {
        printf("    ");
    }
    for (size_t i = 0; l && l[i].name; i++) {
        if (l[i].val != o->val) {
            continue;
        }
        char spelling[64];
        snprintf(spelling, sizeof(spelling), "--%s", l[i].name);
        if (!o->letter && !any_long) {
            arg_name(c, spelling, arg, sizeof(arg));
        }
        printf("%s--%s", sep, l[i].name);
        sep = ", ";
        any_long = true;
    }
    if (o->has_arg == required_argument) {
        printf(any_long ? "=%s" : " %s", arg);
    } else if (o->has_arg == optional_argument) {
        printf(any_long ? "[=%s]" : "[%s]", arg);
    }
    printf("\n");
}

void cli_print_command_help(const cli_command *c)
{
    const char *syn = c->synopsis;

    printf("usage: vdisk %s ", c->name);
    /* The other forms are on lines of their own, "  NAME ..." */
    for (const char *p = syn; *p; p++) {
        putchar(*p);
        if (*p == '\n') {
            printf("       vdisk");
            p += 1;     /* the two spaces: "  diff" */
        }
    }
    printf("\n\nOptions:\n");
    foreach_option(c, print_option, NULL);
    printf("\nThe vdisk(1) manual page says what each option does; "
           "'vdisk --help' lists\nevery command.\n");
}

static void dump_option(const cli_command *c, const help_opt *o,
                        void *opaque)
{
    const struct option *l = c->long_opts;
    const char *sep = "";

    (void)opaque;
    if (o->letter) {
        printf("-%c", o->letter);
        sep = " ";
    }
    for (size_t i = 0; l && l[i].name; i++) {
        if (l[i].val == o->val) {
            printf("%s--%s", sep, l[i].name);
            sep = " ";
        }
    }
    printf("\t%s\n", o->has_arg == required_argument ? "arg"
                     : o->has_arg == optional_argument ? "optarg" : "noarg");
}

int cli_list_options(const char *name)
{
    const cli_command *c = name ? cli_find_command(name) : NULL;

    if (!c) {
        cli_error("--list-options: no such command: %s", name ? name : "");
        return 1;
    }
    foreach_option(c, dump_option, NULL);
    return 0;
}
