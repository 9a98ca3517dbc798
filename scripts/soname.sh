#!/bin/sh
# Prints the soname of the shared library the compiler's linker finds for
# -lNAME, for drivers that dlopen() their library (src/core/dlib.h):
#   scripts/soname.sh NAME CC [CC-ARGS...]
# Prints nothing when there is no such library or readelf is missing.
name=$1
shift
file=$("$@" -print-file-name="lib$name.so" 2>/dev/null) || exit 0
[ -e "$file" ] || exit 0
readelf -d "$file" 2>/dev/null | sed -n 's/.*(SONAME).*\[\(.*\)\].*/\1/p'
