/*
 * The public header must compile on its own, in strict C99 without GNU
 * extensions, and expose what it documents. Built with -std=c99
 * -pedantic-errors; it runs only to prove that it links.
 */
#include <vdisk/vdisk.h>

#include <stdio.h>
#include <string.h>

int main(void)
{
    vd_error err = VD_ERROR_INIT;
    vd_error_clear(&err);
    return strcmp(vd_version(), "") == 0;
}
