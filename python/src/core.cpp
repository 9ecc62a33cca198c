// levattn._core: the Python binding of the C++ library, a thin layer: arrays in and out, option
// structs from keywords, errors mapped to Python exceptions. Every computation is the library's
// and runs with the GIL released. One file per group of library headers (bindings.hpp).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <new>
#include <string>

#include "arrays.hpp"
#include "bindings.hpp"

namespace py = pybind11;
using namespace levattn;
using levattn::python::arg;

PYBIND11_MODULE(_core, m) {
  m.doc() = "levattn: heavy entries of attention and attention over them in linear time (C++ core).";
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const Error& e) {
      switch (e.kind()) {
        case ErrorKind::invalid_argument: PyErr_SetString(PyExc_ValueError, e.what()); return;
        case ErrorKind::io: PyErr_SetString(PyExc_OSError, e.what()); return;
        case ErrorKind::memory: PyErr_SetString(PyExc_MemoryError, e.what()); return;
        case ErrorKind::internal: PyErr_SetString(PyExc_RuntimeError, e.what()); return;
      }
    } catch (const std::bad_alloc&) {  // an allocation no array name was given for: a workspace
      PyErr_SetString(PyExc_MemoryError,
                      "out of memory: a working buffer could not be allocated (the address-space limit, ulimit -v "
                      "or RLIMIT_AS, or the machine's memory; smaller inputs need less)");
    }
  });

  python::bind_scores(m);
  python::bind_sketches(m);
  python::bind_attention(m);
  python::bind_streaming(m);

  m.def("version", [] { return std::string(version()); }, "The library's version string.");
  m.def("build_info", [] {
    const BuildInfo b = build_info();
    py::dict d;
    d["version"] = b.version, d["blas"] = b.blas, d["blas_core"] = b.blas_core, d["isa"] = b.isa;
    d["cpu_isa"] = b.cpu_isa, d["bf16"] = b.bf16, d["threads"] = b.threads, d["mpi"] = b.mpi, d["sanitizers"] = b.sanitizers;
    return d;
  }, "The build: version, BLAS, its kernel core, the kernel ISA in use and the CPU's best, threads.");
  m.def("info_text", [] { return to_string(build_info()); }, "What `levattn info` prints.");
}
