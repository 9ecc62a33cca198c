# levattnOpenBLAS.cmake: the imported target OpenBLAS::OpenBLAS, after find_package(OpenBLAS
# CONFIG). OpenBLAS packages built with CMake define it; others (Debian's) only set
# OpenBLAS_LIBRARIES and OpenBLAS_INCLUDE_DIRS, from which it is made here. Included by the build
# and by levattn's installed CMake package.
if(NOT TARGET OpenBLAS::OpenBLAS)
  add_library(OpenBLAS::OpenBLAS INTERFACE IMPORTED)
  set_target_properties(OpenBLAS::OpenBLAS PROPERTIES
    INTERFACE_LINK_LIBRARIES "${OpenBLAS_LIBRARIES}"
    INTERFACE_INCLUDE_DIRECTORIES "${OpenBLAS_INCLUDE_DIRS}")
endif()
