//! The user's completion callback of an asynchronous request, stored inline in the request's
//! context (no allocation for a small closure).
//!
//! [`BlockFile::submit`](crate::BlockFile::submit) takes any `FnOnce(Completed) + Send +
//! 'static`. Boxing it would cost an allocation per request; instead [`Callback`] keeps the
//! closure's bytes in a fixed slot of [`INLINE`] bytes (pointer aligned) and two plain
//! functions, monomorphised for the closure's type, that run it or drop it: a hand-made
//! `dyn FnOnce` whose storage is the request's context itself (a pooled box whose pointer
//! travels in the request's `Window` through dio-core). A closure capturing an `Arc` and an
//! index, or a channel sender and a tag, fits. A larger (or over-aligned) closure is boxed and
//! the box, one pointer, is stored inline: correct, one allocation. Which of the two applies is
//! decided at compile time for each closure type.

use std::marker::PhantomData;
use std::mem::{ManuallyDrop, MaybeUninit, align_of, size_of};

use super::Completed;

/// Bytes of closure stored inline (six pointers).
pub(crate) const INLINE: usize = 6 * size_of::<usize>();

/// The inline storage: pointer aligned.
type Slot = [MaybeUninit<usize>; INLINE / size_of::<usize>()];

/// Whether a closure of type `F` is stored inline (else it is boxed).
const fn fits<F>() -> bool {
    size_of::<F>() <= size_of::<Slot>() && align_of::<F>() <= align_of::<Slot>()
}

/// A type-erased `FnOnce(Completed) + Send`, run at most once, dropped unrun otherwise.
pub(crate) struct Callback {
    slot: Slot,
    /// Moves the closure out of `slot` and the completion out of its place, and runs it.
    call: unsafe fn(*mut Slot, *mut ManuallyDrop<Completed>),
    /// Drops the closure in `slot` without running it.
    drop: unsafe fn(*mut Slot),
    /// Not auto `Send`/`Sync`: the slot's real type decides (see the impls below).
    _erased: PhantomData<*mut ()>,
}

// SAFETY: a `Callback` is only built (by `Callback::new`) from an `F: Send`, and all it does
// with the closure is move it out to run it or drop it, on whichever thread owns the
// `Callback`: moving the `Callback` to another thread moves an `F`, which `F: Send` allows.
unsafe impl Send for Callback {}
// SAFETY: no method takes `&self` and reaches the closure (running and dropping need the
// `Callback` by value or `&mut`), so sharing a `&Callback` between threads exposes nothing of
// the closure.
unsafe impl Sync for Callback {}

/// # Safety
/// `slot` must hold a valid `F`, written by `Callback::inline::<F>` and not moved out or
/// dropped since, and `c` a valid `Completed` not taken since; afterwards both must be treated
/// as moved out (never used nor dropped again), even if the closure panics.
unsafe fn call_slot<F: FnOnce(Completed)>(slot: *mut Slot, c: *mut ManuallyDrop<Completed>) {
    // SAFETY: per this function's contract the slot holds a valid `F` (its size and alignment
    // were checked against the slot at compile time in `inline`) and `c` a valid completion;
    // both are moved out here, once, and the caller never touches either again.
    let (f, c) = unsafe { (slot.cast::<F>().read(), ManuallyDrop::take(&mut *c)) };
    f(c);
}

/// # Safety
/// As [`call_slot`].
unsafe fn drop_slot<F>(slot: *mut Slot) {
    // SAFETY: per this function's contract the slot holds a valid `F`, dropped here in place
    // exactly once; the caller never touches the slot again.
    unsafe { slot.cast::<F>().drop_in_place() };
}

impl Callback {
    /// Store `f`: inline when it fits, boxed otherwise (one allocation). The choice is a
    /// constant of `F`'s type: the branch not taken is not even compiled in.
    pub(crate) fn new<F: FnOnce(Completed) + Send + 'static>(f: F) -> Self {
        if const { fits::<F>() } {
            // SAFETY: `F` fits (the constant just checked).
            unsafe { Self::inline(f) }
        } else {
            Self::boxed(Box::new(f))
        }
    }

    /// Store a boxed closure: the box (one pointer) always fits, checked at compile time.
    fn boxed<F: FnOnce(Completed) + Send + 'static>(f: Box<F>) -> Self {
        const { assert!(fits::<Box<F>>(), "a box does not fit the inline slot") };
        // SAFETY: the closure below captures only the `Box<F>`, so it has the size and
        // alignment of a `Box<F>`, which fits (asserted at compile time above).
        unsafe { Self::inline(move |c: Completed| f(c)) }
    }

    /// Store `f` in the slot.
    ///
    /// # Safety
    /// `F` must fit the slot: `fits::<F>()`.
    unsafe fn inline<F: FnOnce(Completed) + Send + 'static>(f: F) -> Self {
        let mut slot: Slot = [MaybeUninit::uninit(); INLINE / size_of::<usize>()];
        // SAFETY: `F` fits the slot in size and alignment (this function's contract, checked
        // at compile time by both callers), and the slot is memory we own; the `F` is moved in,
        // to be moved out by `call_slot::<F>` or dropped by `drop_slot::<F>`, the two functions
        // stored beside it.
        unsafe { slot.as_mut_ptr().cast::<F>().write(f) };
        Callback {
            slot,
            call: call_slot::<F>,
            drop: drop_slot::<F>,
            _erased: PhantomData,
        }
    }

    /// Run the closure (consumes it: at most once).
    pub(crate) fn call(self, c: Completed) {
        let (mut this, mut c) = (ManuallyDrop::new(self), ManuallyDrop::new(c));
        let call = this.call;
        // SAFETY: the slot holds the closure `call` was made for (written by `inline`, and
        // neither run nor dropped: this is the only place that runs it, consuming `self`, and
        // `Drop` will not run since `this` is `ManuallyDrop`), and `c` was just wrapped. Both
        // are forgotten here, so neither is touched again, even if the closure panics.
        unsafe { call(&mut this.slot, &mut c) }
    }

    /// Run the closure held in `cb` where it is, on the completion where it is (neither is
    /// moved out of its place first: measured, QD32 read: 2242 -> 2200 instructions), leaving
    /// `None`, also if the closure panics. Nothing to run if `cb` is `None` (`c` is dropped).
    ///
    /// # Safety
    /// `c` must be valid (not taken nor dropped before); afterwards it must be treated as moved
    /// out (never used nor dropped again), also if the closure panics.
    pub(crate) unsafe fn call_in(cb: &mut Option<Callback>, c: &mut ManuallyDrop<Completed>) {
        let spent = Spent(cb);
        let Some(this) = spent.0.as_mut() else {
            // SAFETY: `c` is valid (this function's contract) and dropped once, here.
            unsafe { ManuallyDrop::drop(c) };
            return;
        };
        let call = this.call;
        // SAFETY: the slot holds the closure `call` was made for (written by `inline`, neither
        // run nor dropped: running one leaves `None` behind, through `spent`), and `c` is valid
        // (this function's contract). `call` moves both out; `spent` then forgets the
        // `Callback` (so `drop_slot` never runs on the moved-out slot), whether the closure
        // returns or panics, and the caller treats `c` as moved out.
        unsafe { call(&raw mut this.slot, c) }
    }
}

/// Leaves `None` where a callback was run in place, without dropping it (its closure was moved
/// out to run), on return as on a panic.
struct Spent<'a>(&'a mut Option<Callback>);

impl Drop for Spent<'_> {
    fn drop(&mut self) {
        std::mem::forget(self.0.take());
    }
}

impl Drop for Callback {
    fn drop(&mut self) {
        // SAFETY: `drop` runs only for a `Callback` that was not consumed by `call` (which
        // forgets it), so its slot still holds the closure `self.drop` was made for; this is
        // the last use of the slot.
        unsafe { (self.drop)(&mut self.slot) }
    }
}

impl std::fmt::Debug for Callback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Callback")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::embed::iobuf::IoBuffer;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;

    fn done(n: usize) -> Completed {
        Completed {
            result: Ok(n),
            buf: IoBuffer::Heap(Vec::new()),
        }
    }

    /// Counts drops of the value it guards.
    struct Token(Arc<AtomicUsize>);
    impl Drop for Token {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn small_closures_are_inline_and_large_ones_boxed() {
        let (tx, _rx) = mpsc::channel::<(usize, Completed)>();
        let arc = Arc::new(0u8);
        let sender_and_tag = move |c: Completed| tx.send((3, c)).unwrap();
        let arc_and_index = move |_c: Completed| drop((arc, 7usize));
        assert!(fits_val(&sender_and_tag));
        assert!(fits_val(&arc_and_index));
        let big = [0u64; 16];
        assert!(!fits_val(&move |_c: Completed| assert_eq!(big[0], 0)));
    }

    fn fits_val<F>(_: &F) -> bool {
        fits::<F>()
    }

    #[test]
    fn a_callback_runs_once_with_its_captures() {
        let seen = Arc::new(AtomicUsize::new(0));
        let s = seen.clone();
        let cb = Callback::new(move |c: Completed| {
            s.fetch_add(c.result.unwrap(), Ordering::SeqCst);
        });
        cb.call(done(5));
        assert_eq!(seen.load(Ordering::SeqCst), 5);
        assert_eq!(
            Arc::strong_count(&seen),
            1,
            "the capture was dropped after the run"
        );
    }

    #[test]
    fn a_boxed_callback_runs_and_drops_like_an_inline_one() {
        let drops = Arc::new(AtomicUsize::new(0));
        let t = Token(drops.clone());
        let pad = [1u64; 16];
        let seen = Arc::new(AtomicUsize::new(0));
        let s = seen.clone();
        let cb = Callback::new(move |c: Completed| {
            let _t = &t;
            s.fetch_add(c.result.unwrap() + pad[3] as usize, Ordering::SeqCst);
        });
        cb.call(done(1));
        assert_eq!(seen.load(Ordering::SeqCst), 2);
        assert_eq!(drops.load(Ordering::SeqCst), 1);
        // Dropped unrun: the captures are dropped, exactly once.
        let t = Token(drops.clone());
        let cb = Callback::new(move |_c: Completed| {
            let _t = &t;
            assert_eq!(pad[0], 1);
        });
        drop(cb);
        assert_eq!(drops.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn an_unrun_inline_callback_drops_its_captures_once() {
        let drops = Arc::new(AtomicUsize::new(0));
        let t = Token(drops.clone());
        let cb = Callback::new(move |_c: Completed| {
            let _t = &t;
        });
        assert_eq!(drops.load(Ordering::SeqCst), 0);
        drop(cb);
        assert_eq!(drops.load(Ordering::SeqCst), 1);
    }

    /// Run in place: runs once with the completion, leaves `None` (so the context's later drop
    /// drops nothing more), also when the closure panics; nothing to run drops the completion.
    #[test]
    fn a_callback_run_in_place_runs_once_and_leaves_none() {
        let drops = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(AtomicUsize::new(0));
        let (t, s) = (Token(drops.clone()), seen.clone());
        let mut cb = Some(Callback::new(move |c: Completed| {
            let _t = t;
            s.fetch_add(c.result.unwrap(), Ordering::SeqCst);
        }));
        let mut c = ManuallyDrop::new(done(4));
        // SAFETY: `c` was just wrapped, and is not used again.
        unsafe { Callback::call_in(&mut cb, &mut c) };
        assert!(cb.is_none());
        assert_eq!(seen.load(Ordering::SeqCst), 4);
        assert_eq!(
            drops.load(Ordering::SeqCst),
            1,
            "the captures were dropped once"
        );
        // A panic: caught by the caller; the captures and the completion's buffer are dropped
        // once, and `None` is left behind.
        let t = Token(drops.clone());
        let mut cb = Some(Callback::new(move |_c: Completed| {
            let _t = t;
            panic!("boom");
        }));
        let buf = Arc::new(());
        let b = buf.clone();
        let mut c = ManuallyDrop::new(done(0));
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _b = b;
            // SAFETY: `c` was just wrapped, and is not used again.
            unsafe { Callback::call_in(&mut cb, &mut c) }
        }));
        assert!(r.is_err());
        assert!(cb.is_none(), "a panicking callback is spent too");
        drop(cb);
        assert_eq!(
            drops.load(Ordering::SeqCst),
            2,
            "dropped once, not again with the option"
        );
        assert_eq!(Arc::strong_count(&buf), 1);
        // Nothing to run: the completion is dropped (its buffer freed), nothing else happens.
        let mut none = None;
        let mut c = ManuallyDrop::new(done(1));
        // SAFETY: `c` was just wrapped, and is not used again.
        unsafe { Callback::call_in(&mut none, &mut c) };
        assert!(none.is_none());
    }

    #[test]
    fn a_panicking_callback_drops_its_captures_once() {
        let drops = Arc::new(AtomicUsize::new(0));
        let t = Token(drops.clone());
        let cb = Callback::new(move |_c: Completed| {
            let _t = t;
            panic!("boom");
        });
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| cb.call(done(0))));
        assert!(r.is_err());
        assert_eq!(drops.load(Ordering::SeqCst), 1);
    }
}
