//! The native module `smax._smax`: thin bindings from NumPy arrays to the smax library.
//!
//! The Python package (`python/smax/`) turns user input into arrays of a supported dtype and
//! allocates the outputs; the functions here find the smax layouts of those arrays, release the
//! GIL and run the kernels. An array whose strides no smax layout expresses makes a function
//! return `False` (the Python side copies it once and calls again). Every `smax::Error` becomes
//! `smax.SmaxError`, a `ValueError` with the same message.

use std::sync::{Arc, Mutex};

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use smax::Par;

mod arrays;
mod attn;
mod calib;
mod core;
mod decode;
mod loss;
mod route;

pyo3::create_exception!(_smax, SmaxError, PyValueError, "An error smax returned for the given input (a `ValueError`).");

/// A `smax::Error` as a Python exception.
pub(crate) fn err(e: smax::Error) -> PyErr {
    SmaxError::new_err(e.to_string())
}

/// The pool `set_num_threads` installed (`None`: rayon's global pool).
static POOL: Mutex<Option<Arc<rayon::ThreadPool>>> = Mutex::new(None);

fn pool() -> Option<Arc<rayon::ThreadPool>> {
    POOL.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// Runs `f` with the GIL released, in the pool `set_num_threads` chose, passing the `Par` to
/// give the kernels (`Par::Seq` for one thread). Results do not depend on the thread count.
pub(crate) fn run<R: Send>(py: Python<'_>, f: impl FnOnce(Par) -> R + Send) -> R {
    let p = pool();
    py.detach(move || match p {
        Some(p) if p.current_num_threads() == 1 => f(Par::Seq),
        Some(p) => p.install(|| f(Par::Rayon)),
        None => f(Par::Rayon),
    })
}

/// Runs smax calls on `n` threads from now on (a dedicated pool); `n = 0` returns to rayon's
/// global pool (`RAYON_NUM_THREADS` or one thread per core).
#[pyfunction]
fn set_num_threads(n: usize) -> PyResult<()> {
    let new = if n == 0 {
        None
    } else {
        let p = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .thread_name(|i| format!("smax-{i}"))
            .build()
            .map_err(|e| PyRuntimeError::new_err(format!("could not start {n} threads: {e}")))?;
        Some(Arc::new(p))
    };
    *POOL.lock().unwrap_or_else(|p| p.into_inner()) = new;
    Ok(())
}

/// The number of threads smax calls run on.
#[pyfunction]
fn get_num_threads() -> usize {
    pool().map_or_else(rayon::current_num_threads, |p| p.current_num_threads())
}

/// The SIMD level smax chose for this CPU (`SMAX_SIMD` overrides it).
#[pyfunction]
fn simd_level() -> String {
    format!("{:?}", smax::SimdLevel::default_level())
}

#[pymodule]
fn _smax(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("SmaxError", m.py().get_type::<SmaxError>())?;
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(get_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(simd_level, m)?)?;
    core::register(m)?;
    loss::register(m)?;
    attn::register(m)?;
    decode::register(m)?;
    calib::register(m)?;
    route::register(m)?;
    Ok(())
}
