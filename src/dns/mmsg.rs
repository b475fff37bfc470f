//! Datagrams in batches: `recvmmsg(2)` takes every query waiting on a socket (up to
//! [`BATCH`]) in one system call, and `sendmmsg(2)` sends their answers in one. Under
//! load a worker then sleeps and wakes once per batch instead of once per query, which
//! is where a UDP server on a busy machine spends its time (scheduler and wake-ups, not
//! its own code). Answers of a batch to one client go as one segmented send
//! ([`Sender`]). Linux only, like the rest of the server's socket handling.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::AsRawFd;

use socket2::SockAddr;

/// Datagrams moved per system call at most.
pub const BATCH: usize = 32;
/// The same, as the system calls take it (32 fits any C unsigned int).
const BATCH_C: libc::c_uint = BATCH as libc::c_uint;
/// An address buffer's size, as the kernel takes it (128 bytes fits a socklen_t).
const ADDR_LEN: libc::socklen_t = size_of::<libc::sockaddr_storage>() as libc::socklen_t;

/// Receive buffers for one worker: [`BATCH`] datagrams of `len` bytes each.
pub struct Received {
    bufs: Vec<Box<[u8]>>,
    addrs: Vec<libc::sockaddr_storage>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    count: usize,
}

impl Received {
    pub fn new(len: usize) -> Self {
        Received {
            bufs: (0..BATCH).map(|_| vec![0u8; len].into_boxed_slice()).collect(),
            // SAFETY: all-zero is a valid value of these plain C structs.
            addrs: (0..BATCH).map(|_| unsafe { zeroed() }).collect(),
            iovs: (0..BATCH).map(|_| libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }).collect(),
            hdrs: (0..BATCH).map(|_| unsafe { zeroed() }).collect(),
            count: 0,
        }
    }

    /// Waits for at least one datagram (within the socket's read timeout), then takes
    /// every one already waiting, up to [`BATCH`]. Returns how many.
    pub fn recv(&mut self, socket: &UdpSocket) -> io::Result<usize> {
        self.count = 0;
        for i in 0..BATCH {
            self.iovs[i] = libc::iovec { iov_base: self.bufs[i].as_mut_ptr().cast(), iov_len: self.bufs[i].len() };
            // SAFETY: all-zero is a valid msghdr; the fields set point at live buffers.
            let mut hdr: libc::msghdr = unsafe { zeroed() };
            hdr.msg_name = std::ptr::from_mut(&mut self.addrs[i]).cast();
            hdr.msg_namelen = ADDR_LEN;
            hdr.msg_iov = std::ptr::from_mut(&mut self.iovs[i]);
            hdr.msg_iovlen = 1;
            self.hdrs[i] = libc::mmsghdr { msg_hdr: hdr, msg_len: 0 };
        }
        // SAFETY: `hdrs` holds BATCH initialised headers whose buffers outlive the call.
        let n = unsafe { libc::recvmmsg(socket.as_raw_fd(), self.hdrs.as_mut_ptr(), BATCH_C, libc::MSG_WAITFORONE, std::ptr::null_mut()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        self.count = usize::try_from(n).unwrap_or(0).min(BATCH);
        Ok(self.count)
    }

    /// Datagram `i` of the last [`Received::recv`] and its sender (`None`: not an IP
    /// sender, or `i` out of range). A datagram longer than the buffer is cut to it.
    pub fn get(&self, i: usize) -> Option<(&[u8], SocketAddr)> {
        if i >= self.count {
            return None;
        }
        let len = usize::try_from(self.hdrs[i].msg_len).unwrap_or(usize::MAX).min(self.bufs[i].len());
        Some((&self.bufs[i][..len], socket_addr(&self.addrs[i])?))
    }
}

/// The IP address and port in a `sockaddr_storage` the kernel filled.
fn socket_addr(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match libc::c_int::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in, which it is large enough for.
            let a = unsafe { &*std::ptr::from_ref(storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)), u16::from_be(a.sin_port))))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for sockaddr_in6.
            let a = unsafe { &*std::ptr::from_ref(storage).cast::<libc::sockaddr_in6>() };
            let ip = Ipv6Addr::from(a.sin6_addr.s6_addr);
            Some(SocketAddr::V6(SocketAddrV6::new(ip, u16::from_be(a.sin6_port), a.sin6_flowinfo, a.sin6_scope_id)))
        }
        _ => None,
    }
}

/// Datagrams one `UDP_SEGMENT` send carries at most (the kernel's `UDP_MAX_SEGMENTS`
/// since the option exists).
const SEGMENTS_MAX: usize = 64;
/// Payload bytes one `UDP_SEGMENT` send carries at most (a UDP datagram's limit).
const SEGMENT_BYTES_MAX: usize = 65_507;
/// Datagrams longer than this are never segmented: the kernel refuses a segment that
/// does not fit the route's MTU (EINVAL), which would turn segmenting off for good.
/// 1,232 bytes fit any IPv6 path (1,280 − 48), which is why DNS uses it as its default
/// EDNS size; nearly every answer is far shorter.
const SEGMENT_LEN_MAX: usize = 1_232;

/// The control message that asks the kernel to cut one send into datagrams of
/// `size` bytes (`UDP_SEGMENT`, generic segmentation offload for UDP).
#[repr(C)]
struct SegmentCmsg {
    hdr: libc::cmsghdr,
    size: u16,
    _pad: [u8; 6],
}

/// Sends answers, each batch in one `sendmmsg(2)`. Answers of one batch to the same
/// destination and of the same length (a load asking one name again and again) go as
/// one send the kernel cuts into datagrams (`UDP_SEGMENT`): one trip through the IP
/// stack and the device for the lot instead of one each, where a busy DNS server spends
/// most of its time. A kernel or device that refuses segmentation (no checksum offload)
/// turns it off for good, and those answers go one by one.
pub struct Sender {
    segment: bool,
}

impl Default for Sender {
    fn default() -> Self {
        Sender { segment: true }
    }
}

impl Sender {
    /// Sends every `(datagram, destination)` in as few system calls as the kernel takes
    /// them, keeping the order of the datagrams to each destination. A datagram the
    /// kernel refuses is skipped, as a failed `send_to` would be, and the rest still go;
    /// the first such error is returned.
    pub fn send_all(&mut self, socket: &UdpSocket, out: &[(Vec<u8>, SocketAddr)]) -> io::Result<()> {
        let groups = if self.segment { segment_groups(out) } else { (0..out.len()).map(|i| vec![i]).collect() };
        self.send(socket, out, &groups)
    }

    /// Sends `groups` of `out`; the datagrams of a segmented send the kernel refused as
    /// such go again one by one, and segmenting stops.
    fn send(&mut self, socket: &UdpSocket, out: &[(Vec<u8>, SocketAddr)], groups: &[Vec<usize>]) -> io::Result<()> {
        let (refused, failed): (Vec<_>, Vec<_>) =
            send_groups(socket, out, groups).into_iter().partition(|(k, e)| groups[*k].len() > 1 && refuses_segmentation(e));
        let mut first_error = failed.into_iter().next().map(|(_, e)| e);
        if let Some((_, e)) = refused.first() {
            tracing::info!(error = %e, "udp segmentation refused: dns answers go one datagram per send");
            self.segment = false;
            let singles: Vec<Vec<usize>> = refused.iter().flat_map(|(k, _)| groups[*k].iter().map(|i| vec![*i])).collect();
            if let Some((_, e)) = send_groups(socket, out, &singles).into_iter().next() {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// Errors by which a kernel or device says it cannot segment a UDP send.
fn refuses_segmentation(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EIO | libc::EINVAL | libc::ENOPROTOOPT | libc::EOPNOTSUPP))
}

/// `out`'s indices cut into sends: per destination in order of first appearance, runs
/// of datagrams of one length up to [`SEGMENT_LEN_MAX`] (the last of a run may be
/// shorter: the kernel's rule), within the kernel's segment and size limits. A run of
/// one is a plain datagram.
fn segment_groups(out: &[(Vec<u8>, SocketAddr)]) -> Vec<Vec<usize>> {
    let mut by_destination: Vec<(SocketAddr, Vec<usize>)> = Vec::new();
    for (i, (_, to)) in out.iter().enumerate() {
        match by_destination.iter_mut().find(|(d, _)| d == to) {
            Some((_, list)) => list.push(i),
            None => by_destination.push((*to, vec![i])),
        }
    }
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for (_, list) in by_destination {
        let mut run: Vec<usize> = Vec::new();
        for i in list {
            let joins = run.first().is_some_and(|&first| {
                let size = out[first].0.len();
                let last = out[run[run.len() - 1]].0.len();
                last == size
                    && size <= SEGMENT_LEN_MAX
                    && out[i].0.len() <= size
                    && run.len() < SEGMENTS_MAX
                    && (run.len() + 1).saturating_mul(size) <= SEGMENT_BYTES_MAX
            });
            if !joins && !run.is_empty() {
                groups.push(std::mem::take(&mut run));
            }
            run.push(i);
        }
        groups.push(run);
    }
    groups
}

/// Sends each group of `out`'s datagrams as one message (several: segmented), in as few
/// `sendmmsg` calls as the kernel takes. A message the kernel refuses is skipped and the
/// rest still go; the refusals are returned with their groups' indices.
fn send_groups(socket: &UdpSocket, out: &[(Vec<u8>, SocketAddr)], groups: &[Vec<usize>]) -> Vec<(usize, io::Error)> {
    let addrs: Vec<SockAddr> = groups.iter().map(|g| SockAddr::from(out[g[0]].1)).collect();
    let mut iovs: Vec<Vec<libc::iovec>> =
        groups.iter().map(|g| g.iter().map(|&i| libc::iovec { iov_base: out[i].0.as_ptr().cast_mut().cast(), iov_len: out[i].0.len() }).collect()).collect();
    let mut cmsgs: Vec<SegmentCmsg> = groups.iter().map(|g| segment_cmsg(&out[g[0]].0)).collect();
    let mut hdrs: Vec<libc::mmsghdr> = Vec::with_capacity(groups.len());
    for (k, g) in groups.iter().enumerate() {
        // SAFETY: all-zero is a valid msghdr; the fields set point at live buffers.
        let mut hdr: libc::msghdr = unsafe { zeroed() };
        hdr.msg_name = addrs[k].as_ptr().cast_mut().cast();
        hdr.msg_namelen = addrs[k].len();
        hdr.msg_iov = iovs[k].as_mut_ptr();
        hdr.msg_iovlen = iovs[k].len();
        if g.len() > 1 {
            hdr.msg_control = std::ptr::from_mut(&mut cmsgs[k]).cast();
            hdr.msg_controllen = size_of::<SegmentCmsg>();
        }
        hdrs.push(libc::mmsghdr { msg_hdr: hdr, msg_len: 0 });
    }
    let (mut done, mut failed) = (0, Vec::new());
    while done < hdrs.len() {
        let rest = &mut hdrs[done..];
        let len = libc::c_uint::try_from(rest.len()).unwrap_or(libc::c_uint::MAX);
        // SAFETY: `rest` holds initialised headers whose buffers, addresses and control
        // messages outlive the call; the kernel only reads them (and writes `msg_len`).
        let n = unsafe { libc::sendmmsg(socket.as_raw_fd(), rest.as_mut_ptr(), len, 0) };
        match usize::try_from(n) {
            Ok(sent) if sent > 0 => done += sent,
            // The first message left failed: skip it, keep the rest going.
            _ => {
                failed.push((done, io::Error::last_os_error()));
                done += 1;
            }
        }
    }
    failed
}

/// The `UDP_SEGMENT` control message for a group whose first datagram is `first`.
fn segment_cmsg(first: &[u8]) -> SegmentCmsg {
    // SAFETY: CMSG_LEN only computes a length.
    let len = unsafe { libc::CMSG_LEN(size_of::<u16>() as libc::c_uint) };
    // SAFETY: all-zero is a valid cmsghdr (whatever padding the C library gives it).
    let mut hdr: libc::cmsghdr = unsafe { zeroed() };
    hdr.cmsg_len = usize::try_from(len).expect("a control message length fits a usize");
    hdr.cmsg_level = libc::SOL_UDP;
    hdr.cmsg_type = libc::UDP_SEGMENT;
    SegmentCmsg { hdr, size: u16::try_from(first.len()).unwrap_or(u16::MAX), _pad: [0; 6] }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_batch_is_received_and_answered_in_order() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        server.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let to = server.local_addr().unwrap();
        // More than one batch waiting, one longer than the buffer.
        let n = BATCH + 3;
        for i in 0..n {
            client.send_to(&[i as u8; 3], to).unwrap();
        }
        client.send_to(&[7u8; 100], to).unwrap();
        let mut rx = Received::new(16);
        let mut got = Vec::new();
        while got.len() < n + 1 {
            let k = rx.recv(&server).unwrap();
            assert!((1..=BATCH).contains(&k));
            for i in 0..k {
                let (d, from) = rx.get(i).unwrap();
                assert_eq!(from, client.local_addr().unwrap());
                got.push(d.to_vec());
            }
            assert!(rx.get(k).is_none(), "only what was received");
        }
        assert_eq!(got[..n], (0..n).map(|i| vec![i as u8; 3]).collect::<Vec<_>>()[..]);
        assert_eq!(got[n], vec![7u8; 16], "cut to the buffer");
        let answers: Vec<(Vec<u8>, SocketAddr)> = got.iter().map(|d| (d.iter().map(|b| b + 1).collect(), client.local_addr().unwrap())).collect();
        Sender::default().send_all(&server, &answers).unwrap();
        let mut buf = [0u8; 64];
        for (want, _) in &answers {
            let (len, from) = client.recv_from(&mut buf).unwrap();
            assert_eq!((&buf[..len], from), (&want[..], to));
        }
        assert!(Sender::default().send_all(&server, &[]).is_ok());
    }

    fn client() -> (UdpSocket, SocketAddr) {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let addr = socket.local_addr().unwrap();
        (socket, addr)
    }

    /// Reads exactly the datagrams `out` sends to `addr`, in order, and nothing more.
    fn receives_exactly(socket: &UdpSocket, addr: SocketAddr, out: &[(Vec<u8>, SocketAddr)]) {
        let mut buf = [0u8; 2048];
        socket.set_nonblocking(false).unwrap();
        for (want, _) in out.iter().filter(|(_, to)| *to == addr) {
            let (len, _) = socket.recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..len], &want[..], "one datagram per answer, whole and in order");
        }
        socket.set_nonblocking(true).unwrap();
        assert_eq!(socket.recv_from(&mut buf).unwrap_err().kind(), io::ErrorKind::WouldBlock, "nothing more");
    }

    #[test]
    fn runs_of_one_length_per_destination_make_the_segmented_sends() {
        let (a, b): (SocketAddr, SocketAddr) = ("127.0.0.1:1".parse().unwrap(), "127.0.0.1:2".parse().unwrap());
        let sized = |lens: &[(usize, SocketAddr)]| lens.iter().map(|(n, to)| (vec![0u8; *n], *to)).collect::<Vec<_>>();
        // Per destination, in order; a shorter datagram ends a run, a longer one starts one.
        let out = sized(&[(40, a), (40, b), (40, a), (30, a), (40, a), (50, a), (40, b)]);
        assert_eq!(segment_groups(&out), vec![vec![0, 2, 3], vec![4], vec![5], vec![1, 6]]);
        // At most SEGMENTS_MAX a send, and at most SEGMENT_BYTES_MAX bytes.
        let many = sized(&vec![(10, a); SEGMENTS_MAX + 5]);
        assert_eq!(segment_groups(&many).iter().map(Vec::len).collect::<Vec<_>>(), vec![SEGMENTS_MAX, 5]);
        let runs = SEGMENT_BYTES_MAX / SEGMENT_LEN_MAX;
        let full = sized(&vec![(SEGMENT_LEN_MAX, a); runs + 1]);
        assert_eq!(segment_groups(&full).iter().map(Vec::len).collect::<Vec<_>>(), vec![runs, 1]);
        // Longer than any path's MTU may take: never segmented.
        let long = sized(&[(SEGMENT_LEN_MAX + 1, a); 3]);
        assert_eq!(segment_groups(&long), vec![vec![0], vec![1], vec![2]]);
        assert!(segment_groups(&[]).is_empty());
    }

    #[test]
    fn the_control_message_has_the_kernels_layout() {
        // SAFETY: these only compute lengths.
        let (space, data_at) = unsafe { (libc::CMSG_SPACE(2), libc::CMSG_LEN(0)) };
        assert_eq!(size_of::<SegmentCmsg>(), usize::try_from(space).unwrap());
        assert_eq!(std::mem::offset_of!(SegmentCmsg, size), usize::try_from(data_at).unwrap());
    }

    #[test]
    fn segmented_answers_arrive_as_separate_datagrams_in_order() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let ((sa, a), (sb, b)) = (client(), client());
        let mut out = Vec::new();
        for i in 0..30u8 {
            out.push((vec![i; 40], a));
            if i % 3 == 0 {
                out.push((vec![i; 7 + usize::from(i)], b));
            }
        }
        out.push((vec![99; 12], a));
        assert!(segment_groups(&out).iter().any(|g| g.len() > 1), "some answers share a send");
        let mut sender = Sender::default();
        sender.send_all(&server, &out).unwrap();
        assert!(sender.segment, "loopback takes segmented sends");
        receives_exactly(&sa, a, &out);
        receives_exactly(&sb, b, &out);
    }

    #[test]
    fn a_refused_segmented_send_goes_one_by_one_and_segmenting_stops() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let (sa, a) = client();
        // More segments in one send than any kernel takes (128 at most): refused (EINVAL).
        let out: Vec<(Vec<u8>, SocketAddr)> = (0..200u8).map(|i| (vec![i; 10], a)).collect();
        let mut sender = Sender::default();
        sender.send(&server, &out, &[(0..out.len()).collect()]).unwrap();
        assert!(!sender.segment, "segmenting stopped");
        receives_exactly(&sa, a, &out);
        // From then on every datagram is sent alone.
        sender.send_all(&server, &out[..5]).unwrap();
        receives_exactly(&sa, a, &out[..5]);
    }
}
