//! How many HTTP connections the front door holds open: in total, and per client.
//!
//! [`ConnCounts`] is the pure count (no I/O, no locks); [`ConnGate`] shares it between the
//! accept loop and the connection tasks and hands out a [`ConnPermit`] per admitted
//! connection, which gives its place back when dropped, so that however a connection task
//! ends (finished, failed, cancelled at shutdown) the count cannot leak. A connection over
//! either cap is refused at accept, before any task is spawned or byte is read.
//!
//! A client is its IPv4 address, or its IPv6 /64 prefix: one host is usually given a whole
//! /64, and could otherwise open the per-client cap once per address.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};

/// Why a connection was refused; doubles as the metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The front door holds its total cap of connections.
    Total,
    /// This client holds its cap of connections.
    PerClient,
}

impl Refusal {
    pub fn kind(self) -> &'static str {
        match self {
            Refusal::Total => "total",
            Refusal::PerClient => "per_ip",
        }
    }
}

/// The client a peer address counts as: the IPv4 address (an IPv4-mapped IPv6 address is
/// its IPv4 one), or the /64 an IPv6 address is in.
pub fn client_of(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

/// Open connections, in total and per client, under two caps.
#[derive(Debug)]
pub struct ConnCounts {
    max_total: usize,
    max_per_client: usize,
    total: usize,
    per_client: HashMap<IpAddr, usize>,
}

impl ConnCounts {
    pub fn new(max_total: usize, max_per_client: usize) -> ConnCounts {
        ConnCounts { max_total, max_per_client, total: 0, per_client: HashMap::new() }
    }

    /// Counts one more connection of `client`, or says which cap it would pass.
    pub fn admit(&mut self, client: IpAddr) -> Result<(), Refusal> {
        if self.total >= self.max_total {
            return Err(Refusal::Total);
        }
        let n = self.per_client.entry(client).or_insert(0);
        if *n >= self.max_per_client {
            return Err(Refusal::PerClient);
        }
        *n += 1;
        self.total += 1;
        Ok(())
    }

    /// One connection of `client` ended (a client with none left is forgotten).
    pub fn release(&mut self, client: IpAddr) {
        if let Some(n) = self.per_client.get_mut(&client) {
            *n -= 1;
            if *n == 0 {
                self.per_client.remove(&client);
            }
            self.total -= 1;
        }
    }

    pub fn total(&self) -> usize {
        self.total
    }

    /// Clients with at least one connection open.
    pub fn clients(&self) -> usize {
        self.per_client.len()
    }
}

/// [`ConnCounts`] shared by the accept loop and the connection tasks.
#[derive(Clone)]
pub struct ConnGate(Arc<Mutex<ConnCounts>>);

impl ConnGate {
    pub fn new(max_total: usize, max_per_client: usize) -> ConnGate {
        ConnGate(Arc::new(Mutex::new(ConnCounts::new(max_total, max_per_client))))
    }

    /// A permit for one connection from `peer`, held for as long as the connection is served.
    pub fn admit(&self, peer: IpAddr) -> Result<ConnPermit, Refusal> {
        let client = client_of(peer);
        let mut c = self.0.lock().unwrap_or_else(|e| e.into_inner());
        c.admit(client)?;
        crate::metrics::set_http_connections(c.total());
        Ok(ConnPermit { gate: self.clone(), client })
    }

    pub fn open(&self) -> usize {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).total()
    }
}

/// One admitted connection's place; given back when dropped.
pub struct ConnPermit {
    gate: ConnGate,
    client: IpAddr,
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        let mut c = self.gate.0.lock().unwrap_or_else(|e| e.into_inner());
        c.release(self.client);
        crate::metrics::set_http_connections(c.total());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn each_cap_refuses_with_its_reason_and_a_release_makes_room() {
        let (a, b, c) = (ip("10.0.0.1"), ip("10.0.0.2"), ip("10.0.0.3"));
        let mut n = ConnCounts::new(5, 2);
        // (client, admit or release, expected, total after)
        let steps: [(IpAddr, bool, Result<(), Refusal>, usize); 11] = [
            (a, true, Ok(()), 1),
            (a, true, Ok(()), 2),
            (a, true, Err(Refusal::PerClient), 2),
            (b, true, Ok(()), 3),
            (b, true, Ok(()), 4),
            (c, true, Ok(()), 5),
            (c, true, Err(Refusal::Total), 5),
            (a, false, Ok(()), 4),
            (c, true, Ok(()), 5),
            (a, true, Err(Refusal::Total), 5),
            (b, false, Ok(()), 4),
        ];
        for (i, (client, admit, expected, total)) in steps.into_iter().enumerate() {
            let got = if admit {
                n.admit(client)
            } else {
                n.release(client);
                Ok(())
            };
            assert_eq!((got, n.total()), (expected, total), "step {i}");
        }
        // A release of a client with nothing open changes nothing.
        n.release(ip("10.9.9.9"));
        assert_eq!(n.total(), 4);
    }

    #[test]
    fn ipv6_clients_are_their_64_and_mapped_ipv4_is_ipv4() {
        assert_eq!(client_of(ip("2001:db8:1:2:aaaa::1")), client_of(ip("2001:db8:1:2:bbbb::9")));
        assert_ne!(client_of(ip("2001:db8:1:2::1")), client_of(ip("2001:db8:1:3::1")));
        assert_eq!(client_of(ip("::ffff:10.0.0.1")), ip("10.0.0.1"));
        assert_eq!(client_of(ip("127.0.0.1")), ip("127.0.0.1"));
    }

    #[test]
    fn permits_give_their_place_back_when_dropped() {
        let gate = ConnGate::new(8, 2);
        let a = ip("127.0.0.1");
        let p1 = gate.admit(a).unwrap();
        let p2 = gate.admit(ip("::ffff:127.0.0.1")).unwrap();
        assert_eq!(gate.admit(a).err(), Some(Refusal::PerClient), "the mapped address is the same client");
        drop(p1);
        let p3 = gate.admit(a).unwrap();
        assert_eq!(gate.open(), 2);
        // Dropped on another task, as a connection task ends.
        let handle = std::thread::spawn(move || drop((p2, p3)));
        handle.join().unwrap();
        assert_eq!(gate.open(), 0);
        assert_eq!(gate.0.lock().unwrap().clients(), 0, "a client with nothing open is forgotten");
    }
}
