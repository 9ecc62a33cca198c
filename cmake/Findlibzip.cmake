# Findlibzip.cmake: libzip (Debian: libzip-dev), as the imported target libzip::zip.
#
# libzip's own CMake package defines the same target, but Debian's copy of it also imports the
# zipcmp, zipmerge and ziptool programs and stops with an error when they are not installed
# (they are separate packages). This module needs only the header and the library. A libzip::zip
# target that already exists is used as it is.
#
# Sets libzip_FOUND, libzip_VERSION, libzip_INCLUDE_DIR, libzip_LIBRARY. Installed with levattn's
# CMake package, whose config finds libzip with it.
if(TARGET libzip::zip)
  set(libzip_FOUND TRUE)
  return()
endif()

find_path(libzip_INCLUDE_DIR zip.h)
find_path(libzip_CONF_INCLUDE_DIR zipconf.h HINTS "${libzip_INCLUDE_DIR}")
find_library(libzip_LIBRARY zip)
mark_as_advanced(libzip_INCLUDE_DIR libzip_CONF_INCLUDE_DIR libzip_LIBRARY)

if(libzip_CONF_INCLUDE_DIR AND EXISTS "${libzip_CONF_INCLUDE_DIR}/zipconf.h")
  file(STRINGS "${libzip_CONF_INCLUDE_DIR}/zipconf.h" _libzip_version_line
    REGEX "^#define[ \t]+LIBZIP_VERSION[ \t]+\"[^\"]*\"")
  string(REGEX REPLACE "^.*\"([^\"]*)\".*$" "\\1" libzip_VERSION "${_libzip_version_line}")
  unset(_libzip_version_line)
endif()

include(FindPackageHandleStandardArgs)
find_package_handle_standard_args(libzip
  REQUIRED_VARS libzip_LIBRARY libzip_INCLUDE_DIR libzip_CONF_INCLUDE_DIR
  VERSION_VAR libzip_VERSION)

if(libzip_FOUND)
  add_library(libzip::zip UNKNOWN IMPORTED)
  set_target_properties(libzip::zip PROPERTIES
    IMPORTED_LOCATION "${libzip_LIBRARY}"
    INTERFACE_INCLUDE_DIRECTORIES "${libzip_INCLUDE_DIR};${libzip_CONF_INCLUDE_DIR}")
endif()
