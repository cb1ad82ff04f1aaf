package main

import (
	"bytes"
	"encoding/binary"
	"hash/crc32"
	"net"
	"testing"
)

func TestPayloadGen(t *testing.T) {
	a := newPayloadGen(1, 0, 100)
	m := append([]byte(nil), a.message(3)...)
	if len(m) != headerLen+100 {
		t.Fatalf("message length %d", len(m))
	}
	if binary.BigEndian.Uint32(m[0:4]) != 3 || binary.BigEndian.Uint32(m[4:8]) != 100 {
		t.Fatalf("header %x", m[:8])
	}
	if binary.BigEndian.Uint32(m[8:12]) != crc32.ChecksumIEEE(m[headerLen:]) {
		t.Fatal("header checksum does not match payload")
	}
	if !bytes.Equal(m, newPayloadGen(1, 0, 100).message(3)) {
		t.Fatal("messages are not deterministic")
	}
	if bytes.Equal(m[headerLen:], newPayloadGen(1, 1, 100).message(3)[headerLen:]) {
		t.Fatal("connections share payloads")
	}
	if len(newPayloadGen(1, 0, 0).message(0)) != headerLen {
		t.Fatal("empty payload")
	}
}

func TestAddrString(t *testing.T) {
	mapped := &net.TCPAddr{IP: net.ParseIP("10.1.0.2"), Port: 80}
	if got := addrString(mapped); got != "10.1.0.2:80" || !isV4Mapped(mapped) {
		t.Fatalf("addrString(v4-mapped) = %q, mapped=%v", got, isV4Mapped(mapped))
	}
	v4 := &net.TCPAddr{IP: net.ParseIP("10.1.0.2").To4(), Port: 80}
	if isV4Mapped(v4) {
		t.Fatal("plain IPv4 reported as v4-mapped")
	}
	if got := addrString(&net.TCPAddr{IP: net.ParseIP("fd00:1::2"), Port: 8080}); got != "[fd00:1::2]:8080" {
		t.Fatalf("addrString(v6) = %q", got)
	}
}

func TestNtohs(t *testing.T) {
	var p uint16
	b := []byte{0x1f, 0x90} // 8080 in network byte order
	p = uint16(b[0]) | uint16(b[1])<<8
	if got := ntohs(p); got != 8080 {
		t.Fatalf("ntohs = %d", got)
	}
}
