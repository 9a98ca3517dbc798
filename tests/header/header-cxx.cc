// The public header must compile as C++ (extern "C", no C-only syntax)
// and link from a C++ program.
#include <vdisk/vdisk.h>

#include <cstring>

int main()
{
    vd_error err = VD_ERROR_INIT;
    vd_error_clear(&err);
    vd_opts *o = vd_opts_new();
    int r = vd_opts_set(o, "size", "1M");
    vd_opts_free(&o);
    return r != 0 || std::strlen(vd_version()) == 0;
}
