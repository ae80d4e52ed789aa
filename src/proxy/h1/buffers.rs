//! Buffers of the lean path, lent to connections only while they read a request or relay a
//! response: an idle keep-alive connection holds none (nginx frees its header buffers while
//! a connection waits, HAProxy takes buffers from pools).
//!
//! Per worker thread free lists (no lock), bounded so that a burst of connections does not
//! keep its memory for good. A buffer that grew past its size is not kept.

use std::cell::RefCell;

/// What a request head is read into (it grows, up to the head limit, when needed).
pub const REQUEST_BUF: usize = 8 * 1024;
/// What a response is relayed through.
pub const RESPONSE_BUF: usize = 16 * 1024;
/// Room for what is built per request: the upstream request head, a rewritten response head.
pub const HEAD_ROOM: usize = 2048;
/// A head buffer that grew past this is not kept.
const HEAD_ROOM_KEPT_MAX: usize = 4 * HEAD_ROOM;
/// Buffers of each size kept per thread: up to 24 MiB per worker after a burst of 1,024
/// requests in flight at once. With 256, 1,000 busy keep-alive connections allocated and
/// zeroed a read and a relay buffer for most requests (3 % of the CPU in a profile at
/// `wrk -c1000`).
const KEPT: usize = 1024;

thread_local! {
    static FREE: RefCell<[Vec<Vec<u8>>; 2]> = const { RefCell::new([Vec::new(), Vec::new()]) };
    static HEADS: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// An empty buffer with room for a head ([`HEAD_ROOM`] bytes at least).
pub fn take_head() -> Vec<u8> {
    HEADS
        .try_with(|free| free.borrow_mut().pop())
        .ok()
        .flatten()
        .unwrap_or_else(|| Vec::with_capacity(HEAD_ROOM))
}

/// Gives a head buffer back (emptied); one that never got room, or grew large, is dropped.
pub fn give_head(mut buf: Vec<u8>) {
    if !(HEAD_ROOM..=HEAD_ROOM_KEPT_MAX).contains(&buf.capacity()) {
        return;
    }
    buf.clear();
    let _ = HEADS.try_with(|free| {
        let mut free = free.borrow_mut();
        if free.len() < KEPT {
            free.push(buf);
        }
    });
}

fn list(size: usize) -> Option<usize> {
    match size {
        REQUEST_BUF => Some(0),
        RESPONSE_BUF => Some(1),
        _ => None,
    }
}

/// A buffer of `size` bytes (`REQUEST_BUF` or `RESPONSE_BUF`); its contents are whatever
/// was there before.
pub fn take(size: usize) -> Vec<u8> {
    let reused = list(size).and_then(|i| {
        FREE.try_with(|free| free.borrow_mut()[i].pop())
            .ok()
            .flatten()
    });
    reused.unwrap_or_else(|| vec![0; size])
}

/// Gives a buffer back.
pub fn give(buf: Vec<u8>) {
    let Some(i) = list(buf.len()) else {
        return;
    };
    let _ = FREE.try_with(|free| {
        let mut free = free.borrow_mut();
        if free[i].len() < KEPT {
            free[i].push(buf);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_by_size_and_bounded() {
        let a = take(RESPONSE_BUF);
        let ptr = a.as_ptr();
        give(a);
        let b = take(RESPONSE_BUF);
        assert_eq!(b.as_ptr(), ptr, "the same buffer came back");
        assert_eq!(b.len(), RESPONSE_BUF);
        // A request buffer is not a response buffer.
        give(b);
        assert_eq!(take(REQUEST_BUF).len(), REQUEST_BUF);
        // Grown buffers are dropped, not kept.
        give(vec![0; REQUEST_BUF * 2]);
        assert_eq!(take(REQUEST_BUF).len(), REQUEST_BUF);
        // At most KEPT per size.
        for _ in 0..KEPT + 10 {
            give(vec![0; REQUEST_BUF]);
        }
        let kept = FREE.with(|f| f.borrow()[0].len());
        assert_eq!(kept, KEPT);
    }

    #[test]
    fn head_buffers_come_back_empty_and_only_when_of_a_kept_size() {
        let mut a = take_head();
        assert!(a.is_empty() && a.capacity() >= HEAD_ROOM);
        a.extend_from_slice(b"GET / HTTP/1.1\r\n");
        let ptr = a.as_ptr();
        give_head(a);
        let b = take_head();
        assert_eq!((b.as_ptr(), b.len()), (ptr, 0), "the same buffer, emptied");
        // Never used (no room) or grown big: dropped, not kept.
        give_head(Vec::new());
        give_head(Vec::with_capacity(HEAD_ROOM_KEPT_MAX * 2));
        let c = take_head();
        assert!(c.capacity() >= HEAD_ROOM && c.capacity() <= HEAD_ROOM_KEPT_MAX);
    }
}
