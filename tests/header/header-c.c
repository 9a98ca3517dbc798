/*
 * The public headers must compile on their own, in strict C99 without
 * GNU extensions, and expose what they document. Built with -std=c99
 * -pedantic-errors against libvdisk.so; it runs to prove that it links
 * and that a few of the public helpers behave as their comments say.
 */
#include <vdisk/job.h>
#include <vdisk/nbd-server.h>
#include <vdisk/rbd-diff.h>
#include <vdisk/vdisk.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(void)
{
    vd_error err = VD_ERROR_INIT;
    vd_opts *o = vd_opts_new();
    char *v;
    bool b = false;
    int r;

    vd_error_clear(&err);
    if (strcmp(vd_version(), "") == 0 || !o) {
        return 1;
    }
    /* The error helpers: first error wins, context is prepended. */
    vd_error_set(&err, -EINVAL, "bad %s", "thing");
    vd_error_set(&err, -EIO, "second");
    vd_error_prepend(&err, "ctx: ");
    if (!vd_error_is_set(&err) || err.code != -EINVAL ||
        strcmp(err.message, "ctx: bad thing") != 0) {
        fprintf(stderr, "error helpers: %d '%s'\n", err.code, err.message);
        return 1;
    }
    /* The flattener and the takers. */
    vd_error_clear(&err);
    r = vd_opts_from_json(o, "{\"a\": {\"b\": true}, \"n\": 5}", &err);
    v = vd_opts_take(o, "n");
    if (r != 0 || !v || strcmp(v, "5") != 0 ||
        vd_opts_take_bool(o, "a.b", false, &b, &err) != 0 || !b ||
        vd_opts_first_key(o) != NULL) {
        fprintf(stderr, "options: r=%d '%s'\n", r, err.message);
        return 1;
    }
    free(v);
    vd_opts_free(&o);
    return vd_find_node("no-such-node") != NULL;
}
