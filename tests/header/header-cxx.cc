// The public headers must compile as C++ (extern "C", no C-only syntax)
// and link from a C++ program against libvdisk.so.
#include <vdisk/job.h>
#include <vdisk/nbd-server.h>
#include <vdisk/rbd-diff.h>
#include <vdisk/vdisk.h>

#include <cstring>

int main()
{
    vd_error err = VD_ERROR_INIT;
    vd_error_clear(&err);
    vd_opts *o = vd_opts_new();
    int r = vd_opts_set(o, "size", "1M");
    vd_opts_free(&o);
    vd_nbd_server *srv = vd_nbd_server_new(1, 0, false);
    bool none = srv && !vd_nbd_server_has_export(srv, "x");
    vd_nbd_server_free(&srv);
    return r != 0 || !none || std::strlen(vd_version()) == 0;
}
