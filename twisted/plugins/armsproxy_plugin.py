from twisted.application.service import ServiceMaker

armsproxy = ServiceMaker(
    "armsproxy", "armsproxy.tap", "ARMS Proxy between libarms SAs and an RS", "armsproxy"
)
