//go:build !linux

package dnsfilter

// oobCap: no control data is read or sent here.
const oobCap = 0

// setPktinfo: answers leave from the kernel's choice of source here.
func setPktinfo(int, bool) error { return nil }

func parseAnswerFrom([]byte) answerFrom { return answerFrom{} }

func (answerFrom) put([]byte) int { return 0 }
