# package_consumer.cmake: the installed CMake package works for a consumer. Installs the build into
# a fresh prefix, configures and builds tests/consumer against it with find_package(levattn), and
# runs the result. Everything is written under WORK_DIR (in the build tree).
#
#   cmake -DBUILD_DIR=<levattn build> -DCONSUMER_DIR=<tests/consumer> -DWORK_DIR=<scratch>
#         -DCXX_COMPILER=<compiler> -DGENERATOR=<generator> [-DCONFIG=<config>]
#         [-DCOMPONENT=<install component>] [-DCONSUMER_FLAGS=<compile and link flags>]
#         -P package_consumer.cmake
foreach(var BUILD_DIR CONSUMER_DIR WORK_DIR CXX_COMPILER GENERATOR)
  if(NOT DEFINED ${var} OR "${${var}}" STREQUAL "")
    message(FATAL_ERROR "package_consumer.cmake: -D${var}=... is required")
  endif()
endforeach()
if(NOT CONFIG)
  set(CONFIG Release)
endif()

file(REMOVE_RECURSE "${WORK_DIR}")
file(MAKE_DIRECTORY "${WORK_DIR}")
set(prefix "${WORK_DIR}/prefix")
set(build "${WORK_DIR}/build")

function(step what)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "package_consumer: ${what} failed (${rc}):\n${out}")
  endif()
  message(STATUS "package_consumer: ${what}: ok")
endfunction()

set(flag_args)
if(CONSUMER_FLAGS)
  set(flag_args "-DCMAKE_CXX_FLAGS=${CONSUMER_FLAGS}" "-DCMAKE_EXE_LINKER_FLAGS=${CONSUMER_FLAGS}")
endif()
set(component_args)
if(COMPONENT)
  set(component_args --component "${COMPONENT}")
endif()
step("install into ${prefix}"
  "${CMAKE_COMMAND}" --install "${BUILD_DIR}" --prefix "${prefix}" --config "${CONFIG}" ${component_args})

# Only the fresh prefix may provide levattn: no package registries, no other prefixes.
step("configure the consumer"
  "${CMAKE_COMMAND}" -S "${CONSUMER_DIR}" -B "${build}" -G "${GENERATOR}"
  "-DCMAKE_BUILD_TYPE=${CONFIG}" "-DCMAKE_CXX_COMPILER=${CXX_COMPILER}"
  "-DCMAKE_PREFIX_PATH=${prefix}" -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF
  -DCMAKE_FIND_USE_SYSTEM_PACKAGE_REGISTRY=OFF ${flag_args})
file(STRINGS "${build}/CMakeCache.txt" found REGEX "^levattn_DIR:")
string(REGEX REPLACE "^levattn_DIR:[A-Z]+=" "" found "${found}")
string(FIND "${found}" "${prefix}/" at)
if(NOT at EQUAL 0)
  message(FATAL_ERROR "package_consumer: levattn was found in '${found}', not in ${prefix}")
endif()

step("build the consumer" "${CMAKE_COMMAND}" --build "${build}" --config "${CONFIG}")
find_program(consumer levattn_consumer PATHS "${build}" "${build}/${CONFIG}" NO_DEFAULT_PATH REQUIRED)
step("run the consumer" "${consumer}" "${WORK_DIR}")
