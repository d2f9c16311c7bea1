package admin

import "testing"

// TestClientKey: the client a report counts under (clientReports) is its
// address, an IPv4-mapped IPv6 one its IPv4 form, an IPv6 one its /64
// whatever its zone: a client does not get another share from each of
// the addresses of its /64, or by connecting over the other family.
func TestClientKey(t *testing.T) {
	same := [][]string{
		{"192.0.2.7:40000", "192.0.2.7:40001", "[::ffff:192.0.2.7]:40002"},
		{"[2001:db8:1:2::1]:40000", "[2001:db8:1:2:ffff:ffff:ffff:ffff]:1", "[2001:db8:1:2::9%eth0]:2"},
		{"[fe80::1%eth0]:1", "[fe80::2%eth1]:1"},
	}
	for i, group := range same {
		for _, a := range group {
			if clientKey(a) != clientKey(group[0]) {
				t.Errorf("clientKey(%s) = %s, clientKey(%s) = %s; want one client", a, clientKey(a), group[0], clientKey(group[0]))
			}
			for _, other := range same[i+1:] {
				if clientKey(a) == clientKey(other[0]) {
					t.Errorf("clientKey(%s) = clientKey(%s) = %s; want two clients", a, other[0], clientKey(a))
				}
			}
		}
	}
	for _, pair := range [][2]string{
		{"192.0.2.7:1", "192.0.2.8:1"},
		{"[2001:db8:1:2::1]:1", "[2001:db8:1:3::1]:1"},
		{"127.0.0.1:1", "[::1]:1"},
	} {
		if clientKey(pair[0]) == clientKey(pair[1]) {
			t.Errorf("clientKey(%s) = clientKey(%s) = %s; want two clients", pair[0], pair[1], clientKey(pair[0]))
		}
	}
}
