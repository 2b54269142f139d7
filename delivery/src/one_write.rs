//! A request leaves in one write.
//!
//! ureq hands its transport a request's head and then its body, each to be
//! sent at once. With TCP_NODELAY (ureq sets it) that is two segments per
//! request, two sends for the sending thread and two wake-ups for the
//! receiver: about half of the sending threads' kernel work at 1000 events a
//! second (docs/benchmark-notes.md, "Fourth pass"). This transport comes
//! last in the connector chain, after TLS (so a request is one TLS record
//! too), and holds what it is handed until ureq waits for the answer, or
//! until its buffer is half full, then sends it with one call.
//!
//! A request is never held back for an answer: ureq waits for input only
//! once it has handed over the whole request, and waiting sends what is
//! held first.

use std::fmt;

use ureq::unversioned::transport::{
    Buffers, ConnectionDetails, Connector, LazyBuffers, NextTimeout, Transport,
};
use ureq::Error;

/// Wraps each connection the chain before it made.
#[derive(Debug)]
pub struct OneWrite {
    /// What a connection holds at most before it sends: ureq's output
    /// buffer. Half of it is always free for ureq to write into.
    pub output: usize,
    /// The size of the buffer answers are read into (they are copied from
    /// the connection's own, which may be smaller).
    pub input: usize,
}

impl Connector<Box<dyn Transport>> for OneWrite {
    type Out = Box<dyn Transport>;

    fn connect(
        &self,
        _details: &ConnectionDetails,
        chained: Option<Box<dyn Transport>>,
    ) -> Result<Option<Self::Out>, Error> {
        Ok(chained.map(|inner| {
            Held {
                inner,
                out: Vec::new(),
                out_size: self.output,
                held: 0,
                input: LazyBuffers::new(self.input, 1),
            }
            .boxed()
        }))
    }
}

/// A connection whose output waits for the next read.
struct Held {
    inner: Box<dyn Transport>,
    /// What is held, then room for ureq to write more (allocated at the
    /// first request).
    out: Vec<u8>,
    out_size: usize,
    /// How much of `out` is held.
    held: usize,
    /// The answer, as ureq reads it (its output half is unused).
    input: LazyBuffers,
}

impl fmt::Debug for Held {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Held")
            .field("inner", &self.inner)
            .field("held", &self.held)
            .finish()
    }
}

impl Held {
    /// Sends what is held, in as few writes as the connection's own buffer
    /// allows (one, for any request smaller than it).
    fn send_held(&mut self, timeout: NextTimeout) -> Result<(), Error> {
        let mut sent = 0;
        while sent < self.held {
            let room = self.inner.buffers().output();
            let n = room.len().min(self.held - sent);
            if n == 0 {
                return Err(Error::Io(std::io::Error::other(
                    "the connection has no output buffer",
                )));
            }
            room[..n].copy_from_slice(&self.out[sent..sent + n]);
            self.inner.transmit_output(n, timeout)?;
            sent += n;
        }
        self.held = 0;
        Ok(())
    }

    fn ensure_output(&mut self) {
        if self.out.len() < self.out_size {
            self.out.resize(self.out_size, 0);
        }
    }
}

impl Transport for Held {
    fn buffers(&mut self) -> &mut dyn Buffers {
        self
    }

    fn transmit_output(&mut self, amount: usize, timeout: NextTimeout) -> Result<(), Error> {
        self.held += amount;
        // NB: ureq writes into what output() leaves free and loops while it
        // has more: keep at least half the buffer free.
        if self.out.len() - self.held < self.out.len() / 2 {
            self.send_held(timeout)?;
        }
        Ok(())
    }

    fn maybe_await_input(&mut self, timeout: NextTimeout) -> Result<bool, Error> {
        self.send_held(timeout)?;
        if self.input.can_use_input() {
            return Ok(true);
        }
        self.await_input(timeout)
    }

    fn await_input(&mut self, timeout: NextTimeout) -> Result<bool, Error> {
        self.send_held(timeout)?;
        if self.inner.buffers().input().is_empty() && !self.inner.await_input(timeout)? {
            return Ok(false);
        }
        let from = self.inner.buffers().input();
        let to = self.input.input_append_buf();
        let n = from.len().min(to.len());
        to[..n].copy_from_slice(&from[..n]);
        self.input.input_appended(n);
        self.inner.buffers().input_consume(n);
        Ok(n > 0)
    }

    fn is_open(&mut self) -> bool {
        self.inner.is_open()
    }

    fn is_tls(&self) -> bool {
        self.inner.is_tls()
    }
}

impl Buffers for Held {
    fn output(&mut self) -> &mut [u8] {
        self.ensure_output();
        &mut self.out[self.held..]
    }

    fn input(&self) -> &[u8] {
        self.input.input()
    }

    fn input_append_buf(&mut self) -> &mut [u8] {
        self.input.input_append_buf()
    }

    fn input_appended(&mut self, amount: usize) {
        self.input.input_appended(amount);
    }

    fn input_consume(&mut self, amount: usize) {
        self.input.input_consume(amount);
    }

    fn tmp_and_output(&mut self) -> (&mut [u8], &mut [u8]) {
        self.ensure_output();
        let (tmp, _) = self.input.tmp_and_output();
        (tmp, &mut self.out[self.held..])
    }

    fn can_use_input(&self) -> bool {
        self.input.can_use_input()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A connection that notes each write and answers with what it is given.
    #[derive(Debug)]
    struct Wire {
        buffers: LazyBuffers,
        writes: Arc<Mutex<Vec<Vec<u8>>>>,
        answer: Vec<u8>,
    }

    impl Transport for Wire {
        fn buffers(&mut self) -> &mut dyn Buffers {
            &mut self.buffers
        }
        fn transmit_output(&mut self, amount: usize, _: NextTimeout) -> Result<(), Error> {
            let sent = self.buffers.output()[..amount].to_vec();
            self.writes.lock().unwrap().push(sent);
            Ok(())
        }
        fn await_input(&mut self, _: NextTimeout) -> Result<bool, Error> {
            let buf = self.buffers.input_append_buf();
            let n = self.answer.len().min(buf.len());
            buf[..n].copy_from_slice(&self.answer[..n]);
            self.answer.drain(..n);
            self.buffers.input_appended(n);
            Ok(n > 0)
        }
        fn is_open(&mut self) -> bool {
            true
        }
    }

    /// A held connection over a wire, the sizes of its output buffer and of
    /// the wire's buffers.
    fn held(
        output: usize,
        wire: (usize, usize),
        answer: &[u8],
    ) -> (Held, Arc<Mutex<Vec<Vec<u8>>>>) {
        let writes = Arc::new(Mutex::new(Vec::new()));
        let wire = Wire {
            buffers: LazyBuffers::new(wire.0, wire.1),
            writes: writes.clone(),
            answer: answer.to_vec(),
        };
        let held = Held {
            inner: Box::new(wire),
            out: Vec::new(),
            out_size: output,
            held: 0,
            input: LazyBuffers::new(1024, 1),
        };
        (held, writes)
    }

    fn timeout() -> NextTimeout {
        NextTimeout::default()
    }

    fn write(t: &mut Held, bytes: &[u8]) {
        let out = t.buffers().output();
        out[..bytes.len()].copy_from_slice(bytes);
        t.transmit_output(bytes.len(), timeout()).unwrap();
    }

    #[test]
    fn head_and_body_go_in_one_write_when_the_answer_is_awaited() {
        let (mut t, writes) = held(1024, (1024, 1024), b"HTTP/1.1 204 No Content\r\n\r\n");
        write(&mut t, b"POST / HTTP/1.1\r\ncontent-length: 2\r\n\r\n");
        write(&mut t, b"{}");
        assert!(
            writes.lock().unwrap().is_empty(),
            "held until the answer is awaited"
        );
        assert!(t.maybe_await_input(timeout()).unwrap());
        assert_eq!(
            *writes.lock().unwrap(),
            [b"POST / HTTP/1.1\r\ncontent-length: 2\r\n\r\n{}".to_vec()]
        );
        assert_eq!(t.buffers().input(), b"HTTP/1.1 204 No Content\r\n\r\n");
    }

    #[test]
    fn a_body_larger_than_half_the_buffer_goes_out_as_it_comes() {
        let (mut t, writes) = held(100, (1024, 100), b"");
        write(&mut t, &[b'h'; 30]);
        write(&mut t, &[b'b'; 40]);
        // 70 held of 100: sent, so that ureq has room again.
        assert_eq!(writes.lock().unwrap().len(), 1);
        assert_eq!(t.buffers().output().len(), 100);
        write(&mut t, &[b'c'; 10]);
        t.await_input(timeout()).unwrap();
        let writes = writes.lock().unwrap();
        assert_eq!(writes.len(), 2);
        assert_eq!(writes[0], [&[b'h'; 30][..], &[b'b'; 40][..]].concat());
        assert_eq!(writes[1], [b'c'; 10]);
    }

    #[test]
    fn what_is_held_goes_through_a_smaller_connection_buffer_in_pieces() {
        let (mut t, writes) = held(100, (1024, 30), b"");
        write(&mut t, &[b'x'; 20]);
        write(&mut t, &[b'y'; 25]);
        t.await_input(timeout()).unwrap();
        let writes = writes.lock().unwrap();
        assert_eq!(writes.concat(), [&[b'x'; 20][..], &[b'y'; 25][..]].concat());
        assert_eq!(writes.iter().map(Vec::len).collect::<Vec<_>>(), [30, 15]);
    }

    /// Through HttpClient and a real socket: the receiver's kernel counts
    /// the segments that carried data.
    #[test]
    fn a_request_reaches_the_receiver_in_one_segment() {
        use std::io::{Read, Write};
        use std::net::{TcpListener, TcpStream};
        use std::os::fd::AsRawFd;
        use std::time::{Duration, Instant};

        const BODY: &str = r#"{"id": 7, "data": {"new": {"company": "Acme"}}}"#;
        fn data_segments_in(socket: &TcpStream) -> u32 {
            // SAFETY: tcp_info is integers only, for which all zeroes is a
            // value.
            let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
            // SAFETY: the kernel writes at most `len` bytes into `info`, which
            // is that large, for a socket this thread holds open.
            let rc = unsafe {
                libc::getsockopt(
                    socket.as_raw_fd(),
                    libc::IPPROTO_TCP,
                    libc::TCP_INFO,
                    (&mut info as *mut libc::tcp_info).cast(),
                    &mut len,
                )
            };
            assert_eq!(rc, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
            info.tcpi_data_segs_in
        }

        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let receiver = std::thread::spawn(move || {
            let (mut socket, _) = listener.accept().unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 8192];
            while !got.ends_with(BODY.as_bytes()) {
                let n = socket.read(&mut buf).unwrap();
                assert!(n > 0, "the request ended early: {got:?}");
                got.extend_from_slice(&buf[..n]);
            }
            socket
                .write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
                .unwrap();
            data_segments_in(&socket)
        });
        let endpoint = crate::Endpoint::from_row(
            "company_created",
            &url,
            "POST",
            "{}",
            None,
            Some(5000),
            None,
            None,
            Duration::from_secs(5),
            1,
        )
        .unwrap();
        let job = crate::Job {
            event_id: 7,
            attempt: 1,
            endpoint: std::sync::Arc::new(endpoint),
            body: BODY.to_string(),
            deadline: Instant::now() + Duration::from_secs(5),
        };
        let client = crate::HttpClient::new(None, None, Vec::new()).unwrap();
        let attempt = client.send(&job);
        assert_eq!(attempt.status_code, Some(204), "{attempt:?}");
        assert_eq!(receiver.join().unwrap(), 1, "head and body in one segment");
    }

    #[test]
    fn an_answer_larger_than_the_connection_buffer_is_read_whole() {
        let answer: Vec<u8> = (0..300u32).map(|i| (i % 251) as u8).collect();
        let (mut t, _) = held(64, (100, 64), &answer);
        let mut read = Vec::new();
        while t.await_input(timeout()).unwrap() {
            let n = t.buffers().input().len();
            read.extend_from_slice(t.buffers().input());
            t.buffers().input_consume(n);
        }
        assert_eq!(read, answer);
    }
}
